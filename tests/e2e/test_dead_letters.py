"""Dead letters end to end, one worker per database: what a dead letter carries on the DLQ
topic and in the dead_letters table, what `holdwall-stream dlq list/show` shows, the
replay round trip after a fix (processed once, also when replayed twice), and purge.

The failing handler is registered the way an operator would: PIPELINE_HANDLERS names
``tests.support.flaky_handlers:fail_while_marker``, which fails while a marker file exists
and, once it is gone, appends the event id to an effects file.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from holdwall_stream.messaging import dead_letter as h
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER
from tests.support.pipeline import (
    as_message,
    consumer_check,
    database,
    event,
    pipeline_worker,
    processed_ids,
    produce,
    run_cli,
    scalar,
)
from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.worker_env import consume_all, query, worker_env

pytestmark = pytest.mark.e2e

FLAKY = "test.flaky"
TIMEOUT_S = 60.0


@dataclass
class Running:
    worker: WorkerProcess
    env: dict[str, str]
    database_url: str
    bootstrap: str
    marker: Path
    effects: Path

    @property
    def topic(self) -> str:
        return self.env["KAFKA_EVENTS_TOPIC"]

    def effects_for(self, event_id: str) -> int:
        if not self.effects.exists():
            return 0
        return self.effects.read_text().split().count(event_id)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
async def running(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    pg_admin_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Running]:
    workdir: Path = tmp_path_factory.mktemp(f"dead-letters-{request.param}")
    marker, effects = workdir / "broken.marker", workdir / "effects.txt"
    with database(request.param, pg_admin_url, workdir) as url:
        env = worker_env(
            kafka_bootstrap,
            url,
            PIPELINE_HANDLERS=f"{FLAKY}=tests.support.flaky_handlers:fail_while_marker",
            PIPELINE_MAX_ATTEMPTS="2",
            PIPELINE_RETRY_BACKOFF_MS="50",
            FLAKY_MARKER=str(marker),
            FLAKY_EFFECTS=str(effects),
        )
        async with pipeline_worker(env, workdir / "worker") as worker:
            yield Running(worker, env, url, kafka_bootstrap, marker, effects)


def db_uuid(running: Running, value: Any) -> Any:
    """How a UUID parameter compares in raw SQL: native on PostgreSQL, hex on SQLite."""
    return value if running.database_url.startswith("postgresql") else value.hex


async def dead_letter_rows(running: Running, **where: Any) -> list[Any]:
    clauses = " AND ".join(f"{name} = :{name}" for name in where) or "1 = 1"
    return list(
        await query(
            running.database_url,
            f"SELECT id, event_id, reason, error, attempts, original_topic, original_partition, "
            f"original_offset, raw, key, replayed_at FROM dead_letters WHERE {clauses} "
            f"ORDER BY id",
            **where,
        )
    )


async def wait_for_row(running: Running, **where: Any) -> Any:
    async def found() -> list[Any]:
        return await dead_letter_rows(running, **where)

    rows = await wait_until_async(found, timeout=TIMEOUT_S, message=f"dead letter {where}")
    assert len(rows) == 1, rows
    return rows[0]


async def dlq_record(running: Running, partition: int, offset: int) -> ConsumerRecord:  # type: ignore[type-arg]
    """The DLQ topic's message for the events topic's ``partition``/``offset``."""
    total = int(await scalar(running.database_url, "SELECT count(*) FROM dead_letters"))
    records = await consume_all(running.bootstrap, running.env["KAFKA_DLQ_TOPIC"], total)
    matching = [
        r
        for r in records
        if dict(r.headers).get(h.DLQ_ORIGINAL_PARTITION) == str(partition).encode()
        and dict(r.headers).get(h.DLQ_ORIGINAL_OFFSET) == str(offset).encode()
    ]
    assert len(matching) == 1, matching
    return matching[0]


def iso(value: bytes) -> datetime:
    parsed = datetime.fromisoformat(value.decode())
    assert parsed.tzinfo is not None
    return parsed


async def test_dead_letters_carry_why_and_where_on_the_topic_in_the_table_and_the_cli(
    running: Running,
) -> None:
    running.marker.touch()
    flaky = event(FLAKY, "order-7", total=12)
    garbage = (b"order-9", b'{"id": "not even close"', [("trace-id", b"t-123")])
    [garbage_at, flaky_at] = await produce(
        running.bootstrap, running.topic, [garbage, as_message(flaky)]
    )

    # --- on the DLQ topic, read with a plain consumer --------------------------------------
    garbage_row = await wait_for_row(
        running, original_partition=garbage_at.partition, original_offset=garbage_at.offset
    )
    flaky_row = await wait_for_row(running, event_id=db_uuid(running, flaky.id))
    record = await dlq_record(running, garbage_at.partition, garbage_at.offset)
    headers = dict(record.headers)
    assert record.key == garbage[0]
    assert record.value == garbage[1]
    assert headers["trace-id"] == b"t-123"  # the original headers travel along
    assert headers[h.DLQ_REASON] == b"not_json"
    assert headers[h.DLQ_ERROR_TYPE] == b"InvalidMessage"
    assert b"not JSON" in headers[h.DLQ_ERROR_MESSAGE]
    assert headers[h.DLQ_ORIGINAL_TOPIC] == running.topic.encode()
    assert headers[h.DLQ_ORIGINAL_PARTITION] == str(garbage_at.partition).encode()
    assert headers[h.DLQ_ORIGINAL_OFFSET] == str(garbage_at.offset).encode()
    assert headers[h.DLQ_ATTEMPTS] == b"1"
    assert iso(headers[h.DLQ_FIRST_FAILURE]) == iso(headers[h.DLQ_LAST_FAILURE])

    record = await dlq_record(running, flaky_at.partition, flaky_at.offset)
    headers = dict(record.headers)
    assert record.key == b"order-7"
    assert headers[EVENT_ID_HEADER] == str(flaky.id).encode()
    assert headers[h.DLQ_REASON] == b"handler_failed"
    assert headers[h.DLQ_ERROR_TYPE] == b"RuntimeError"
    assert b"downstream unavailable" in headers[h.DLQ_ERROR_MESSAGE]
    assert headers[h.DLQ_ATTEMPTS] == b"2"
    assert iso(headers[h.DLQ_FIRST_FAILURE]) < iso(headers[h.DLQ_LAST_FAILURE])
    assert str(flaky.id) not in await processed_ids(running.database_url)
    assert running.effects_for(str(flaky.id)) == 0

    # --- in the dead_letters table ---------------------------------------------------------
    assert garbage_row[2] == "not_json"
    assert (garbage_row[5], garbage_row[6], garbage_row[7]) == (
        running.topic,
        garbage_at.partition,
        garbage_at.offset,
    )
    assert bytes(garbage_row[8]) == garbage[1]
    assert bytes(garbage_row[9]) == garbage[0]
    assert (flaky_row[2], flaky_row[4]) == ("handler_failed", 2)
    assert "downstream unavailable" in flaky_row[3]

    # --- through the CLI, with the worker's environment -------------------------------------
    listed = run_cli(running.env, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    for row in (garbage_row, flaky_row):
        assert any(
            line.split()[0] == str(row[0]) and row[2] in line for line in listed.stdout.splitlines()
        ), listed.stdout
    assert f"event={flaky.id}" in listed.stdout

    listed_json = run_cli(running.env, "dlq", "list", "--json")
    assert listed_json.returncode == 0, listed_json.stderr
    by_id = {entry["id"]: entry for entry in json.loads(listed_json.stdout)}
    assert by_id[flaky_row[0]]["event_id"] == str(flaky.id)
    assert by_id[flaky_row[0]]["attempts"] == 2
    assert by_id[garbage_row[0]]["original_offset"] == garbage_at.offset

    shown = run_cli(running.env, "dlq", "show", str(flaky_row[0]))
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["reason"] == "handler_failed"
    assert detail["key"] == "order-7"
    assert json.loads(detail["raw"])["id"] == str(flaky.id)
    for name in (
        h.DLQ_ERROR_TYPE,
        h.DLQ_ERROR_MESSAGE,
        h.DLQ_ORIGINAL_TOPIC,
        h.DLQ_ORIGINAL_PARTITION,
        h.DLQ_ORIGINAL_OFFSET,
        h.DLQ_ATTEMPTS,
        h.DLQ_FIRST_FAILURE,
        h.DLQ_LAST_FAILURE,
    ):
        assert detail["headers"][name], name
    assert detail["headers"][h.DLQ_ERROR_TYPE] == "RuntimeError"

    missing = run_cli(running.env, "dlq", "show", "987654321")
    assert missing.returncode == 1
    assert "no dead letter with id 987654321" in missing.stderr


async def test_replay_after_the_fix_takes_effect_once_however_often_it_is_replayed(
    running: Running,
) -> None:
    running.marker.touch()
    order = event(FLAKY, "order-11", total=3)
    await produce(running.bootstrap, running.topic, [as_message(order)])
    row = await wait_for_row(running, event_id=db_uuid(running, order.id))
    assert running.effects_for(str(order.id)) == 0

    running.marker.unlink()  # the fix is deployed
    replayed = run_cli(running.env, "dlq", "replay", str(row[0]))
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 1 dead letter(s): {row[0]}" in replayed.stdout

    async def processed() -> bool:
        return str(order.id) in await processed_ids(running.database_url)

    await wait_until_async(processed, timeout=TIMEOUT_S, message="the replayed event processed")
    await wait_until_async(lambda: running.effects_for(str(order.id)) == 1, timeout=TIMEOUT_S)

    # Replaying again re-sends the message; the pipeline sees the id again and skips it.
    consumed = consumer_check(running.worker)["events_consumed"]
    again = run_cli(running.env, "dlq", "replay", str(row[0]))
    assert again.returncode == 0, again.stderr
    await wait_until_async(
        lambda: consumer_check(running.worker)["events_consumed"] > consumed,
        timeout=TIMEOUT_S,
        message="the second replay consumed",
    )
    assert running.effects_for(str(order.id)) == 1
    rows = await query(
        running.database_url,
        "SELECT count(*) FROM processed_events WHERE event_id = :id",
        id=db_uuid(running, order.id),
    )
    assert rows[0][0] == 1
    assert len(await dead_letter_rows(running, event_id=db_uuid(running, order.id))) == 1

    listed = run_cli(running.env, "dlq", "list")
    assert f"event={order.id}" not in listed.stdout  # replayed ones are hidden by default
    listed_all = run_cli(running.env, "dlq", "list", "--all")
    line = next(x for x in listed_all.stdout.splitlines() if f"event={order.id}" in x)
    assert "(replayed)" in line

    nothing = run_cli(running.env, "dlq", "replay")
    assert nothing.returncode == 2
    assert "--all" in nothing.stderr


async def test_purge_refuses_without_yes_and_deletes_with_it(running: Running) -> None:
    [placed] = await produce(running.bootstrap, running.topic, [(b"k", b"\xff\xfe", [])])
    await wait_for_row(running, original_partition=placed.partition, original_offset=placed.offset)
    before = int(await scalar(running.database_url, "SELECT count(*) FROM dead_letters"))
    assert before >= 1

    refused = run_cli(running.env, "dlq", "purge")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert await scalar(running.database_url, "SELECT count(*) FROM dead_letters") == before

    purged = run_cli(running.env, "dlq", "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert f"purged {before} dead letter(s)" in purged.stdout
    assert await scalar(running.database_url, "SELECT count(*) FROM dead_letters") == 0
    listed = run_cli(running.env, "dlq", "list")
    assert "0 dead letter(s)" in listed.stdout
