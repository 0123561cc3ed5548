"""Whatever arrives on the events topic, the pipeline accounts for every message and keeps
consuming: arbitrary bytes, arbitrary JSON, envelope look-alikes and valid envelopes (new
or repeated ids, matching, missing or wrong keys, stray headers), against ONE long-lived
worker per database.

For each message: it is processed (its event id has a processed_events row) or it is in
dead_letters (with the reason the envelope parser gives, its bytes and its key), never
both and never neither; messages in = processed (new ids + repeats) + dead-lettered.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from holdwall_stream.pipeline.envelope import (
    EVENT_ID_HEADER,
    EventEnvelope,
    InvalidMessage,
    encode_envelope,
    parse_envelope,
)
from tests.support.pipeline import (
    Message,
    consumer_check,
    database,
    event,
    health,
    pipeline_worker,
    processed_ids,
    produce,
    scalar,
)
from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.worker_env import query, worker_env

pytestmark = pytest.mark.e2e

# A soak run: HOLDWALL_PIPELINE_EXAMPLES=200 pytest tests/e2e/test_pipeline_properties.py
EXAMPLES = int(os.environ.get("HOLDWALL_PIPELINE_EXAMPLES", "20"))
MAX_MESSAGE_BYTES = 1_000_000  # the worker's KAFKA_MAX_MESSAGE_BYTES default
SETTLE_TIMEOUT_S = 60.0


@dataclass
class Running:
    """The module's worker, and what has been sent to it so far (across examples)."""

    worker: WorkerProcess
    env: dict[str, str]
    database_url: str
    bootstrap: str
    sent: int = 0
    dead: int = 0
    valid_ids: set[str] = field(default_factory=set)
    # (partition, offset) of every message the parser rejects, and of every valid one
    invalid_at: set[tuple[int, int]] = field(default_factory=set)
    valid_at: dict[tuple[int, int], Message] = field(default_factory=dict)
    envelopes: list[EventEnvelope] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return self.env["KAFKA_EVENTS_TOPIC"]


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
async def running(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    pg_admin_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Running]:
    workdir: Path = tmp_path_factory.mktemp(f"properties-{request.param}")
    with database(request.param, pg_admin_url, workdir) as url:
        env = worker_env(kafka_bootstrap, url)
        async with pipeline_worker(env, workdir / "worker") as worker:
            yield Running(worker, env, url, kafka_bootstrap)


# --- what gets thrown at the topic ---------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
envelopes = st.builds(
    EventEnvelope,
    id=st.uuids(),
    type=st.text(min_size=1, max_size=40),
    aggregate_id=st.text(min_size=1, max_size=30),
    occurred_at=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))])),
    schema_version=st.integers(min_value=1, max_value=3),
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
stray_headers = st.lists(
    st.tuples(
        st.sampled_from([EVENT_ID_HEADER, "dlq-reason", "trace-id"]) | st.text(max_size=8),
        st.binary(max_size=12),
    ),
    max_size=2,
)


ENVELOPE_FIELDS = ["id", "type", "aggregate_id", "occurred_at", "schema_version", "data"]


def envelope_like(env: EventEnvelope, damage: str, name: str, value: Any) -> bytes:
    """A valid envelope with one field removed or replaced, or an unknown one added."""
    obj = json.loads(encode_envelope(env))
    if damage == "drop":
        del obj[name]
    elif damage == "replace":
        obj[name] = value
    else:
        obj[f"x-{name}"] = value
    return json.dumps(obj).encode()


@st.composite
def messages(draw: st.DrawFn, running: Running) -> Message:
    kind = draw(
        st.sampled_from(["valid", "valid", "valid", "repeat", "bytes", "json", "damaged", "null"])
    )
    headers = draw(stray_headers)
    if kind in ("valid", "repeat"):
        # The same draws whatever was sent before (Hypothesis replays examples and insists
        # on that); the pool of earlier envelopes only decides what a draw means.
        env = draw(envelopes)
        index = draw(st.integers(min_value=0, max_value=10**6))
        other_content = draw(st.booleans())
        if kind == "repeat" and running.envelopes:
            env = running.envelopes[index % len(running.envelopes)]
            if other_content:  # same id, other content: still the same event
                env = env.model_copy(update={"data": {"repeat": True}})
        key_choice = draw(st.sampled_from(["match", "match", "none", "random"]))
        key = {
            "match": env.aggregate_id.encode(),
            "none": None,
            "random": draw(st.binary(max_size=12)),
        }[key_choice]
        return key, encode_envelope(env), [(EVENT_ID_HEADER, str(env.id).encode()), *headers]
    key = draw(st.none() | st.binary(max_size=12))
    if kind == "bytes":
        return key, draw(st.binary(max_size=300)), headers
    if kind == "json":
        return key, json.dumps(draw(json_values)).encode(), headers
    if kind == "damaged":
        damage = draw(st.sampled_from(["drop", "replace", "add"]))
        name = draw(st.sampled_from(ENVELOPE_FIELDS))
        value = draw(json_values)
        return key, envelope_like(draw(envelopes), damage, name, value), headers
    # aiokafka refuses a message with neither key nor value
    return draw(st.binary(max_size=12)) if key is None else key, None, headers


def fate(key: bytes | None, value: bytes | None) -> EventEnvelope | InvalidMessage:
    """What the pipeline must do with a message: the envelope parser is the contract."""
    try:
        return parse_envelope(value, key=key, max_bytes=MAX_MESSAGE_BYTES)
    except InvalidMessage as exc:
        return exc


# --- the properties ------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_every_message_is_processed_or_dead_lettered(
    running: Running, data: st.DataObject
) -> None:
    batch = data.draw(st.lists(messages(running), min_size=1, max_size=12), label="messages")
    copies = data.draw(st.lists(st.integers(min_value=0, max_value=11), max_size=3), label="again")
    batch += [batch[i % len(batch)] for i in copies]  # the same message twice in a batch
    placed = await produce(running.bootstrap, running.topic, batch)

    valid: dict[tuple[int, int], EventEnvelope] = {}
    invalid: dict[tuple[int, int], tuple[InvalidMessage, Message]] = {}
    for message, meta in zip(batch, placed, strict=True):
        outcome = fate(message[0], message[1])
        position = (meta.partition, meta.offset)
        if isinstance(outcome, InvalidMessage):
            invalid[position] = (outcome, message)
        else:
            valid[position] = outcome
    new_ids = {str(env.id) for env in valid.values()} - running.valid_ids
    repeats = len(valid) - len(new_ids)
    assert len(batch) == len(new_ids) + repeats + len(invalid)

    running.sent += len(batch)
    running.dead += len(invalid)
    running.invalid_at |= set(invalid)
    running.valid_at |= {
        p: m
        for p, m in zip(((m.partition, m.offset) for m in placed), batch, strict=True)
        if p in valid
    }
    running.valid_ids |= {str(env.id) for env in valid.values()}
    running.envelopes.extend(env for env in valid.values() if env not in running.envelopes)

    async def settled() -> bool:
        consumed = consumer_check(running.worker)["events_consumed"]
        stored = await scalar(running.database_url, "SELECT count(*) FROM dead_letters")
        return consumed >= running.sent and stored >= running.dead

    await wait_until_async(settled, timeout=SETTLE_TIMEOUT_S, message="batch consumed and stored")

    # Processed: every valid id, and nothing else ever.
    processed = await processed_ids(running.database_url)
    assert len(processed) == len(set(processed))
    assert set(processed) - running.valid_ids == set(), "processed, but not valid"
    assert running.valid_ids - set(processed) == set(), "valid, but not processed"
    # Dead-lettered: exactly the invalid messages, once each, as they were, with the reason.
    rows = await query(
        running.database_url,
        "SELECT original_partition, original_offset, reason, raw, key, original_topic "
        "FROM dead_letters",
    )
    stored = {(row[0], row[1]): row for row in rows}
    wrongly_parked = {
        p: (stored[p][2], running.valid_at.get(p)) for p in set(stored) - running.invalid_at
    }
    assert not wrongly_parked, "valid messages dead-lettered"
    assert set(stored) == running.invalid_at, "invalid messages not dead-lettered"
    assert len(rows) == running.dead, "a message dead-lettered twice"
    for position, (error, (key, value, _headers)) in invalid.items():
        row = stored[position]
        assert row[2] == error.reason
        assert (bytes(row[3]) if row[3] is not None else None) == value
        assert (bytes(row[4]) if row[4] is not None else None) == key
        assert row[5] == running.topic
    for position in valid:
        assert position not in stored
    assert consumer_check(running.worker)["events_consumed"] == running.sent


async def test_the_pipeline_still_consumes_afterwards(running: Running) -> None:
    final = event("order.final", "order-final", n=1)
    key, value, headers = final.aggregate_id.encode(), encode_envelope(final), []
    await produce(running.bootstrap, running.topic, [(key, value, headers)])

    async def done() -> bool:
        # The row is stored before the offset commit and the counter that follows it.
        consumed = consumer_check(running.worker)["events_consumed"]
        return consumed > running.sent and str(final.id) in await processed_ids(
            running.database_url
        )

    await wait_until_async(done, timeout=SETTLE_TIMEOUT_S, message="the final event processed")
    body = health(running.worker)
    assert body["status"] == "ok", body
    assert body["checks"]["consumer"]["events_consumed"] == running.sent + 1
    processed = await scalar(running.database_url, "SELECT count(*) FROM processed_events")
    assert processed == len(running.valid_ids) + 1
    assert running.worker.is_running()
