"""POST /api/events, GET /api/health and GET /api/metrics of a real worker process.

One worker per dialect with KAFKA_ENABLED=false (the rollback switch): no broker is
needed, events are stored and the outbox accumulates. Every rejected request is checked
against the database: nothing from it may be stored.
"""

from __future__ import annotations

import http.client
import json
import secrets
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from holdwall_stream.outbox.writer import MAX_DATA_DEPTH
from tests.support.json_values import nested
from tests.support.pipeline import database
from tests.support.processes import WorkerProcess
from tests.support.worker_env import get_json, post_json, query

pytestmark = pytest.mark.e2e

MAX_BATCH = 5
MAX_BODY_BYTES = 2048
SASL_SECRET = f"sasl-secret-{secrets.token_hex(8)}"


@dataclass
class Api:
    worker: WorkerProcess
    database_url: str

    @property
    def url(self) -> str:
        return self.worker.base_url

    def post(self, body: Any) -> tuple[int, Any]:
        return post_json(f"{self.url}/api/events", body)

    def health(self) -> dict[str, Any]:
        status, body = get_json(f"{self.url}/api/health")
        assert status == 200, body
        return body

    async def counts(self) -> tuple[int, int]:
        events = await query(self.database_url, "SELECT count(*) FROM events")
        outbox = await query(self.database_url, "SELECT count(*) FROM outbox")
        return int(events[0][0]), int(outbox[0][0])

    async def stored_ids(self, table: str = "events", column: str = "id") -> list[uuid.UUID]:
        rows = await query(self.database_url, f"SELECT {column} FROM {table}")
        return [uuid.UUID(str(row[0])) for row in rows]


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    workdir = tmp_path_factory.mktemp(f"http-{request.param}")
    pg_admin_url = request.getfixturevalue("pg_admin_url")
    with database(request.param, pg_admin_url, workdir) as database_url:
        env = {
            "KAFKA_ENABLED": "false",
            "DATABASE_URL": database_url,
            "API_MAX_BATCH": str(MAX_BATCH),
            "API_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": SASL_SECRET,
            "FAUST_LOOP": "aio",  # the operator's choice of loop wins over uvloop
        }
        with WorkerProcess(env, workdir / "worker") as worker:
            worker.wait_for_http("/api/health", timeout=60, status={200})
            yield Api(worker, database_url)


def _event(aggregate_id: str = "order-42", **fields: Any) -> dict[str, Any]:
    return {
        "type": "order.created",
        "aggregate_id": aggregate_id,
        "data": {"total": 99.5},
        **fields,
    }


def _post_raw(url: str, body: bytes, chunked: bool = False) -> tuple[int, Any]:
    """Posts raw bytes; ``chunked`` sends no Content-Length, so only the read limit applies."""
    target = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    try:
        if chunked:
            chunks = iter([body[i : i + 512] for i in range(0, len(body), 512)])
            connection.request(
                "POST",
                target.path,
                body=chunks,
                headers={"Content-Type": "application/json"},
                encode_chunked=True,
            )
        else:
            connection.request(
                "POST", target.path, body=body, headers={"Content-Type": "application/json"}
            )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


# --- accepted ---


async def test_single_event_is_stored_with_its_outbox_row(api: Api) -> None:
    before = await api.counts()
    status, body = api.post(_event())
    assert status == 201, body
    [event_id] = body["ids"]
    assert body["duplicates"] == []
    assert await api.counts() == (before[0] + 1, before[1] + 1)
    assert uuid.UUID(event_id) in await api.stored_ids()
    assert uuid.UUID(event_id) in await api.stored_ids("outbox", "event_id")


async def test_array_is_stored_in_one_request(api: Api) -> None:
    before = await api.counts()
    events = [_event(f"order-{i}", data={"n": i}) for i in range(MAX_BATCH)]
    status, body = api.post(events)
    assert status == 201, body
    assert len(body["ids"]) == MAX_BATCH == len(set(body["ids"]))
    assert await api.counts() == (before[0] + MAX_BATCH, before[1] + MAX_BATCH)


async def test_given_id_is_kept_and_a_repeated_id_is_not_stored_twice(api: Api) -> None:
    event_id = str(uuid.uuid4())
    status, body = api.post(_event(id=event_id, occurred_at="2024-05-17T10:30:00+02:00"))
    assert (status, body) == (201, {"ids": [event_id], "duplicates": []})
    after_first = await api.counts()

    status, body = api.post(_event(id=event_id, data={"total": 1}))
    assert (status, body) == (201, {"ids": [event_id], "duplicates": [event_id]})
    status, body = api.post([_event(id=event_id), _event(id=event_id)])
    assert status == 201, body
    assert body["duplicates"] == [event_id, event_id]

    assert await api.counts() == after_first
    assert (await api.stored_ids()).count(uuid.UUID(event_id)) == 1
    assert (await api.stored_ids("outbox", "event_id")).count(uuid.UUID(event_id)) == 1


# --- rejected: a JSON error and nothing stored ---


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"", "empty", id="empty-body"),
        pytest.param(b"   \n", "empty", id="blank-body"),
        pytest.param(b'{"type": "order.created", ', "JSON", id="invalid-json"),
        pytest.param(b'{"type": "t", "aggregate_id": "a", "data": {"v": NaN}}', "JSON", id="nan"),
        pytest.param(
            b'[{"type": "t", "aggregate_id": "a", "data": {}}, '
            b'{"type": "t", "aggregate_id": "a", "data": {"v": Infinity}}]',
            "JSON",
            id="infinity-in-array",
        ),
        pytest.param(b"\xff\xfe{}", "JSON", id="not-utf8"),
        pytest.param(b"[]", "empty", id="empty-array"),
        pytest.param(b"[" * 1020 + b"]" * 1020, "recursion limit", id="nested-too-deep"),
        pytest.param(
            json.dumps(_event(data=nested(200))).encode(),
            "recursion limit",
            id="data-deeper-than-the-pipeline-parses",
        ),
        pytest.param(
            b'{"type": "t", "aggregate_id": "a", "data": {"v": "\\ud800"}}',
            "JSON",
            id="unpaired-surrogate",
        ),
    ],
)
async def test_bad_json_is_400(api: Api, body: bytes, expected: str) -> None:
    before = await api.counts()
    status, response = _post_raw(f"{api.url}/api/events", body)
    assert status == 400, response
    assert expected in response["error"]
    assert await api.counts() == before


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        pytest.param(42, None, id="not-an-object"),
        pytest.param(["order.created"], None, id="array-item"),
        pytest.param({"type": "order.created", "data": {}}, "aggregate_id", id="missing-field"),
        pytest.param({"aggregate_id": "a", "data": {}}, "type", id="missing-type"),
        pytest.param(_event(data="not an object"), "data", id="data-wrong-type"),
        pytest.param(_event(type=7), "type", id="type-wrong-type"),
        pytest.param(_event(type=""), "type", id="type-empty"),
        pytest.param(_event(id="not-a-uuid"), "id", id="id-not-uuid"),
        pytest.param(_event(occurred_at="2024-05-17T10:30:00"), "occurred_at", id="naive-time"),
        pytest.param(_event(occurred_at="yesterday"), "occurred_at", id="time-not-a-date"),
        pytest.param(_event(colour="red"), "colour", id="extra-field"),
        pytest.param(_event(data=nested(MAX_DATA_DEPTH + 1)), "data", id="data-too-deep"),
        pytest.param(_event(aggregate_id="order\x00-42"), "aggregate_id", id="nul-in-key"),
        pytest.param(_event(schema_version=2**31), "schema_version", id="version-past-integer"),
        pytest.param(_event(type="order\x00created"), "type", id="nul-in-type"),
    ],
)
async def test_invalid_event_is_422_naming_the_field_and_nothing_is_stored(
    api: Api, bad: Any, field: str | None
) -> None:
    before = await api.counts()
    valid_id = str(uuid.uuid4())
    status, body = api.post([_event(id=valid_id), bad])
    assert status == 422, body
    assert "nothing was stored" in body["error"]
    [problem] = body["detail"]
    assert problem["index"] == 1
    if field is None:
        assert "object" in problem["error"]
    else:
        assert field in [error["field"] for error in problem["errors"]], problem
    assert await api.counts() == before
    assert uuid.UUID(valid_id) not in await api.stored_ids()


_TEXT = st.text(st.characters(codec=None), max_size=20)  # NUL and every plane included
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_TEXT, children, max_size=3),
    max_leaves=12,
)
_EVENTS = st.fixed_dictionaries(
    {"type": _TEXT, "aggregate_id": _TEXT, "data": st.dictionaries(_TEXT, _JSON, max_size=3)},
    optional={
        "id": st.uuids().map(str) | _TEXT,
        "occurred_at": st.datetimes(timezones=st.timezones()).map(datetime.isoformat) | _TEXT,
        "schema_version": st.integers(-5, 2**40) | _TEXT,
    },
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.one_of(_EVENTS, st.lists(_EVENTS, min_size=1, max_size=3), _JSON))
def test_whatever_the_body_the_answer_is_stored_or_a_4xx_never_a_500(api: Api, body: Any) -> None:
    """Each 500 this found was input the database refused after validation had passed it
    (an integer past its column, NUL in a text column, 1e400 as JSON's Infinity)."""
    status, response = api.post(body)
    assert status in (201, 400, 413, 422), (status, response)


async def test_a_number_out_of_range_is_422_naming_data(api: Api) -> None:
    """1e400 parses as infinity, which JSON cannot carry on: the envelope would hold null."""
    before = await api.counts()
    body = b'{"type": "t", "aggregate_id": "a", "data": {"v": 1e400}}'
    status, response = _post_raw(f"{api.url}/api/events", body)
    assert status == 422, response
    [problem] = response["detail"]
    assert problem["errors"][0]["field"] == "data"
    assert "out of range" in problem["errors"][0]["message"]
    assert await api.counts() == before


async def test_single_invalid_object_is_422(api: Api) -> None:
    before = await api.counts()
    status, body = api.post({"type": "order.created", "aggregate_id": "a"})
    assert status == 422, body
    assert body["detail"][0]["errors"][0]["field"] == "data"
    assert await api.counts() == before


async def test_more_events_than_api_max_batch_is_413(api: Api) -> None:
    before = await api.counts()
    status, body = api.post([_event(f"order-{i}") for i in range(MAX_BATCH + 1)])
    assert status == 413, body
    assert "API_MAX_BATCH" in body["error"]
    assert await api.counts() == before


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_api_max_body_bytes_is_413(api: Api, chunked: bool) -> None:
    before = await api.counts()
    body = json.dumps(_event(data={"pad": "x" * MAX_BODY_BYTES})).encode()
    status, response = _post_raw(f"{api.url}/api/events", body, chunked=chunked)
    assert status == 413, response
    assert "API_MAX_BODY_BYTES" in response["error"]
    assert await api.counts() == before


# --- health and metrics with Kafka off ---


async def test_health_with_kafka_disabled_is_degraded_and_the_backlog_grows(api: Api) -> None:
    health = api.health()
    assert health["status"] == "degraded"
    assert health["event_loop"] == "asyncio", "FAUST_LOOP=aio was set"
    checks = health["checks"]
    assert checks["kafka"]["status"] == "disabled"
    assert checks["database"]["status"] == "ok"
    backlog = checks["outbox"]["backlog"]
    assert backlog == (await api.counts())[1], "nothing is published while Kafka is off"

    status, body = api.post([_event(f"order-{i}") for i in range(3)])
    assert status == 201, body
    grown = api.health()["checks"]["outbox"]
    assert grown["backlog"] == backlog + 3
    assert grown["oldest_unpublished_age_s"] is not None
    assert grown["counted_s_ago"] < 1.0, "a small backlog is counted afresh for each request"
    assert grown["status"] == "ok", "a switched-off Kafka is not a stuck outbox"


async def test_metrics_prometheus_text(api: Api) -> None:
    with urllib.request.urlopen(f"{api.url}/api/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    for name in (
        "kafka_connections_total",
        "kafka_connection_errors_total",
        "kafka_outbox_published_total",
        "kafka_outbox_publish_errors_total",
        "kafka_outbox_backlog",
        "kafka_circuit_breaker_state",
    ):
        assert name in samples, name
    assert samples["kafka_outbox_backlog"] == (await api.counts())[1]
    assert samples["kafka_outbox_published_total"] == 0
    assert samples["kafka_enabled"] == 0  # alerts tell a rollback from a stuck outbox by it


async def test_refused_requests_are_counted_by_status(api: Api) -> None:
    def refused() -> dict[str, float]:
        with urllib.request.urlopen(f"{api.url}/api/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "api_events_refused"
            for sample in family.samples
        }

    before = refused()
    assert set(before) == {"400", "413", "422", "500", "503"}  # all exposed from the start
    assert api.post([])[0] == 400
    assert api.post({"type": "x"})[0] == 422
    assert api.post({"type": "x"})[0] == 422
    after = refused()
    assert {status: after[status] - before[status] for status in after} == {
        "400": 1,
        "413": 0,
        "422": 2,
        "500": 0,
        "503": 0,
    }


async def test_metrics_json_has_a_kafka_object(api: Api) -> None:
    status, body = get_json(f"{api.url}/api/metrics?format=json")
    assert status == 200, body
    kafka = body["kafka"]
    assert isinstance(kafka, dict)
    assert kafka["outbox_backlog"] == (await api.counts())[1]
    assert kafka["connections"] == 0


async def test_a_method_a_route_does_not_take_is_a_json_405(api: Api) -> None:
    status, body = get_json(f"{api.url}/api/events")
    assert status == 405
    assert body["error"] == "Method Not Allowed: GET /api/events"
    assert "POST" in body["allowed_methods"]


async def test_an_unknown_api_path_is_a_json_404(api: Api) -> None:
    status, body = get_json(f"{api.url}/api/event")
    assert status == 404
    assert body == {"error": "Not Found: GET /api/event"}


async def test_metrics_in_an_unknown_format_is_a_json_400(api: Api) -> None:
    status, body = get_json(f"{api.url}/api/metrics?format=xml")
    assert status == 400
    assert "xml" in body["error"] and "format=json" in body["error"]
    with urllib.request.urlopen(f"{api.url}/api/metrics?format=prometheus", timeout=10) as ok:
        assert ok.status == 200


async def test_sasl_secret_never_shown(api: Api) -> None:
    api.post(_event())  # something in the log besides startup
    shown = [
        api.worker.log_text(),
        json.dumps(api.health()),
        json.dumps(get_json(f"{api.url}/api/metrics?format=json")[1]),
    ]
    with urllib.request.urlopen(f"{api.url}/api/metrics", timeout=10) as response:
        shown.append(response.read().decode())
    for text in shown:
        assert SASL_SECRET not in text
