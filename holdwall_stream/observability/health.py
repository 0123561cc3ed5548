"""GET /api/health: the checklist's Success Criteria turned into ok / degraded / unhealthy.

ok: breaker closed and the outbox moving. degraded (still 200): breaker half-open, recent
retried errors, Kafka switched off, or a rebalance in progress (also the pipeline consumer
still joining its group), while events are still accepted. unhealthy (503): breaker open,
the database unreachable, or the outbox stuck.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from holdwall_stream.event_loop import running_loop_name
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.store import BacklogStats
from holdwall_stream.resilience.breaker import CircuitBreaker
from holdwall_stream.settings import Settings

STATUS_CODES = {"ok": 200, "degraded": 200, "unhealthy": 503}
_RANK = {"ok": 0, "degraded": 1, "unhealthy": 2}
DATABASE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HealthReport:
    status: str
    body: dict[str, Any]

    @property
    def http_status(self) -> int:
        return STATUS_CODES[self.status]


def worst(*statuses: str) -> str:
    return max(statuses, key=_RANK.__getitem__)


def kafka_status(settings: Settings, breaker: CircuitBreaker) -> tuple[str, dict[str, Any]]:
    snapshot = breaker.snapshot()
    body: dict[str, Any] = {
        "brokers": settings.bootstrap_servers,
        "events_topic": settings.kafka_events_topic,
        "dlq_topic": settings.kafka_dlq_topic,
        "circuit_breaker": snapshot,
        "last_error": snapshot.get("last_error"),
    }
    if not settings.kafka_enabled:
        return "degraded", {"status": "disabled", **body}
    state = snapshot["state"]
    if state == "open":
        return "unhealthy", {"status": "error", **body}
    if state == "half_open" or snapshot["consecutive_failures"]:
        return "degraded", {"status": "error", **body}
    return "ok", {"status": "ok", **body}


async def check_database(relay: OutboxRelay, metrics: Metrics) -> BacklogStats:
    """A round trip and the backlog figures, within DATABASE_TIMEOUT_S; ``database_up``
    records how it went (the backlog figures alone may be reused, so say nothing of it)."""
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_S):
            async with relay.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            stats = await relay.backlog()
    except Exception:
        metrics.database_up.set(0)
        raise
    metrics.database_up.set(1)
    return stats


async def build_report(
    settings: Settings,
    relay: OutboxRelay,
    breaker: CircuitBreaker,
    metrics: Metrics,
    consumer: dict[str, Any],
) -> HealthReport:
    statuses = []
    kafka_verdict, kafka_body = kafka_status(settings, breaker)
    statuses.append(kafka_verdict)

    database: dict[str, Any] = {"url": settings.database_url_redacted}
    outbox: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        stats = await check_database(relay, metrics)
        database.update(status="ok", latency_ms=round((time.perf_counter() - started) * 1000, 2))
        stuck = (
            settings.kafka_enabled
            and stats.oldest_age_s is not None
            and stats.oldest_age_s > settings.outbox_stuck_after_s
        )
        outbox.update(
            status="stuck" if stuck else "ok",
            backlog=stats.backlog,
            oldest_unpublished_age_s=stats.oldest_age_s,
            processing_rate_per_s=round(relay.publish_rate(), 2),
            dead_lettered=stats.dead_lettered,
            # Counting a large backlog is expensive, so its figures can be some seconds old.
            counted_s_ago=round(relay.backlog_age_s() or 0.0, 2),
            stuck_after_s=settings.outbox_stuck_after_s,
        )
        statuses.append("unhealthy" if stuck else "ok")
    except Exception as exc:
        database.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        outbox.update(status="unknown")
        statuses.append("unhealthy")

    # "joining" (no partitions from the group yet) and "error" are degraded; "disabled" is
    # Kafka switched off, which the Kafka check already reports.
    consumer_verdict = (
        "degraded"
        if consumer.get("rebalancing") or consumer.get("status") not in ("ok", "disabled")
        else "ok"
    )
    statuses.append(consumer_verdict)
    status = worst(*statuses)
    return HealthReport(
        status=status,
        body={
            "status": status,
            "event_loop": running_loop_name(),
            "checks": {
                "kafka": kafka_body,
                "database": database,
                "outbox": outbox,
                "consumer": consumer,
            },
        },
    )
