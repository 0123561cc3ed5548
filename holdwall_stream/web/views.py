"""Faust web views: POST /api/events, GET /api/health, GET /api/metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
from aiohttp import web
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json
from sqlalchemy.ext.asyncio import AsyncSession

from holdwall_stream.db.deadline import stall_deadline
from holdwall_stream.db.errors import describe, is_database_unavailable
from holdwall_stream.observability.health import build_report, check_database
from holdwall_stream.observability.metrics_json import metrics_as_json
from holdwall_stream.outbox.writer import NewEvent, store_events
from holdwall_stream.runtime import Runtime
from holdwall_stream.web.errors import json_errors

log = logging.getLogger(__name__)
_EVENT = TypeAdapter(NewEvent)
# Seconds a client should wait before sending events again after a 503.
RETRY_AFTER_S = 1
METRICS_FORMATS = ("prometheus", "json")


class BadRequest(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


def register_views(
    app: faust.App, runtime: Runtime, consumer_state: Callable[[], dict[str, Any]]
) -> None:
    settings = runtime.settings
    app.web.web_app.middlewares.append(json_errors)
    refused = runtime.metrics.events_refused

    @app.page("/api/events")
    class EventsView(View):
        async def post(self, request: Request) -> Response:
            try:
                events = _parse_events(await _read_body(request, settings.api_max_body_bytes))
                if len(events) > settings.api_max_batch:
                    raise BadRequest(
                        413,
                        f"too many events in one request: {len(events)} > API_MAX_BATCH="
                        f"{settings.api_max_batch}",
                    )
            except BadRequest as exc:
                refused.labels(status=str(exc.status)).inc()
                body = {"error": exc.error}
                if exc.detail is not None:
                    body["detail"] = exc.detail
                return self.json(body, status=exc.status)
            try:
                async with (
                    # Waiting on a PostgreSQL that stopped answering would hold the pooled
                    # connection for good; the client gets a 503 and sends the events again.
                    stall_deadline(
                        runtime.engine,
                        settings.database_stall_limit_s,
                        f"storing {len(events)} event(s)",
                        "DATABASE_TIMEOUT_MS",
                    ),
                    AsyncSession(runtime.engine) as session,
                    session.begin(),
                ):
                    stored = await store_events(session, events, runtime.target)
            except Exception as exc:
                # The transaction rolled back, or (a connection lost during COMMIT) its
                # outcome is unknown: events are keyed by id, so sending them again is safe.
                if not is_database_unavailable(exc):
                    log.exception("POST /api/events failed")
                    refused.labels(status="500").inc()
                    return self.json(
                        {
                            "error": "internal error: the events were not stored",
                            "detail": type(exc).__name__,
                        },
                        status=500,
                    )
                log.warning("POST /api/events: 503, database unavailable: %s", describe(exc))
                refused.labels(status="503").inc()
                return self.json(
                    {
                        "error": "database unavailable: the events may not have been stored;"
                        " send them again (an id is stored once)",
                        "detail": type(exc).__name__,
                    },
                    status=503,
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            runtime.relay_wake()
            runtime.metrics.events_accepted.inc(len(stored.ids) - len(stored.duplicates))
            return self.json(
                {
                    "ids": [str(i) for i in stored.ids],
                    "duplicates": [str(i) for i in stored.duplicates],
                },
                status=201,
            )

    @app.page("/api/health")
    class HealthView(View):
        async def get(self, request: Request) -> Response:
            try:
                consumer = consumer_state()
            except Exception as exc:  # health must answer, whatever part is broken
                consumer = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
            report = await build_report(
                settings, runtime.relay, runtime.breaker, runtime.metrics, consumer
            )
            return self.json(report.body, status=report.http_status)

    @app.page("/api/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            output = request.query.get("format", "prometheus")
            if output not in METRICS_FORMATS:
                return self.json(
                    {"error": f"unknown format {output[:50]!r}: use ?format=json, or none"},
                    status=400,
                )
            try:
                await check_database(runtime.relay, runtime.metrics)
            except Exception as exc:  # the metrics matter most when the database is down
                log.warning("/api/metrics served the last backlog figures: %s", describe(exc))
            if output == "json":
                return self.json(metrics_as_json(runtime.metrics))
            return web.Response(  # type: ignore[return-value]
                body=generate_latest(runtime.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.content_length  # type: ignore[attr-defined]
    if length is not None and length > limit:
        raise BadRequest(413, f"request body of {length} bytes exceeds API_MAX_BODY_BYTES={limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):  # type: ignore[attr-defined]
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body exceeds API_MAX_BODY_BYTES={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_events(body: bytes) -> list[NewEvent]:
    if not body.strip():
        raise BadRequest(400, "empty body: send a JSON event object or an array of them")
    try:
        # The pipeline's parser (pydantic's), so the API accepts no JSON it would refuse:
        # no NaN or Infinity, no unpaired UTF-16 surrogate, at most 200 levels.
        document = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise BadRequest(400, f"body is not valid JSON: {exc}") from None
    items = document if isinstance(document, list) else [document]
    if not items:
        raise BadRequest(400, "empty array: send at least one event")
    events = []
    problems = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append({"index": index, "error": "each event must be a JSON object"})
            continue
        try:
            events.append(_EVENT.validate_python(item))
        except ValidationError as exc:
            problems.append(
                {
                    "index": index,
                    "errors": [
                        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                        for e in exc.errors()
                    ],
                }
            )
    if problems:
        raise BadRequest(422, "invalid event(s); nothing was stored", problems)
    return events
