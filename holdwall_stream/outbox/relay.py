"""The outbox relay: drains each owned partition in id order into the events topic.

Per partition and batch, in one database transaction: lock the partition (PostgreSQL row
lock, SKIP LOCKED; on SQLite the database write lock), mark its next rows published,
produce them as whole record batches to that partition with acks=all, then commit. A
produce error or a crash rolls the mark back, so rows are re-published (at-least-once)
and never lost; the lock means one worker at a time sends a partition, which keeps order
per key with any number of workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from aiokafka.errors import KafkaConnectionError, KafkaError
from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.errors import CircuitOpenError
from holdwall_stream.messaging.dead_letter import DeadLetterInfo
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox import store
from holdwall_stream.outbox.store import BacklogStats, ClaimedRow
from holdwall_stream.resilience.backoff import backoff_delay
from holdwall_stream.resilience.breaker import CircuitBreaker
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0


class OutboxRelay:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        producer: KafkaProducer,
        breaker: CircuitBreaker,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._producer = producer
        self._breaker = breaker
        self._metrics = metrics
        self._parallel = engine.dialect.name == "postgresql"
        self._failures: dict[int, int] = {}
        self._retry_at: dict[int, float] = {}
        self._published_log: deque[tuple[float, int]] = deque()
        self.last_error: str | None = None
        self.last_success_at: float | None = None

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def prepare(self) -> None:
        async with self._engine.begin() as connection:
            await store.ensure_relay_locks(connection, self._settings.kafka_partitions)

    async def drain(self, partitions: Collection[int]) -> bool:
        """Relays what is waiting in ``partitions``; True if a partition has more right now."""
        if self._parallel:
            more = await asyncio.gather(*(self._drain_partition(p) for p in partitions))
            return any(more)
        more_any = False
        for partition in partitions:
            more_any |= await self._drain_partition(partition)
        return more_any

    async def _drain_partition(self, partition: int) -> bool:
        if time.monotonic() < self._retry_at.get(partition, 0.0):
            return False
        if not self._breaker.allow():
            return False
        try:
            published = await self._relay_batch(partition)
        except (TimeoutError, KafkaError, OSError, CircuitOpenError) as exc:
            self._on_failure(partition, exc)
            return False
        self._breaker.record_success()
        self._failures.pop(partition, None)
        self._retry_at.pop(partition, None)
        return published >= self._settings.outbox_batch_size

    async def _relay_batch(self, partition: int) -> int:
        producer = await self._producer.get()
        claimed: list[ClaimedRow] = []
        try:
            async with self._engine.connect() as connection, connection.begin():
                rows = await store.claim_batch(
                    connection, partition, self._settings.outbox_batch_size
                )
                if not rows:
                    return 0
                claimed = rows
                sendable = await self._dead_letter_oversized(connection, partition, rows)
                started = time.perf_counter()
                futures = []
                batch = producer.create_batch()
                for row in sendable:
                    headers = row.kafka_headers()
                    while (
                        batch.append(
                            key=row.key, value=row.payload, timestamp=None, headers=headers
                        )
                        is None
                    ):
                        futures.append(await self._send(producer, batch, partition))
                        batch = producer.create_batch()
                if batch.record_count():
                    futures.append(await self._send(producer, batch, partition))
                await asyncio.wait_for(
                    asyncio.gather(*futures), self._settings.kafka_request_timeout / 1000
                )
                self._metrics.outbox_publish_latency.observe(time.perf_counter() - started)
        except Exception as exc:
            if claimed:
                await self._record_failure(claimed, f"{type(exc).__name__}: {exc}")
            raise
        self._note_published(len(sendable))
        self._metrics.outbox_batch_size.observe(len(claimed))
        return len(claimed)

    async def _send(self, producer, batch, partition: int) -> asyncio.Future:  # type: ignore[no-untyped-def]
        batch.close()
        return await producer.send_batch(
            batch, self._settings.kafka_events_topic, partition=partition
        )

    async def _dead_letter_oversized(
        self,
        connection,
        partition: int,
        rows: list[ClaimedRow],  # type: ignore[no-untyped-def]
    ) -> list[ClaimedRow]:
        """A row larger than the broker accepts would block its key forever: park it."""
        limit = self._settings.kafka_max_message_bytes
        sendable = []
        for row in rows:
            if row.size <= limit:
                sendable.append(row)
                continue
            reason = f"message of {row.size} bytes exceeds KAFKA_MAX_MESSAGE_BYTES={limit}"
            now = datetime.now(UTC)
            info = DeadLetterInfo(
                source="outbox",
                reason="too_large",
                error_type="MessageSizeTooLarge",
                error_message=reason,
                attempts=row.attempts + 1,
                first_failure_at=now,
                last_failure_at=now,
                event_id=str(row.event_id),
                original_topic=self._settings.kafka_events_topic,
                original_partition=partition,
            )
            # The DLQ has the same size limit: the payload stays in the outbox row.
            await self._producer.send(
                self._settings.kafka_dlq_topic, None, key=row.key, headers=info.headers()
            )
            await store.mark_dead_lettered(connection, row.id, reason)
            self._metrics.outbox_dead_lettered.inc()
            self._metrics.dlq_sent.labels(reason="too_large").inc()
            log.error("Outbox row %d (event %s) sent to the DLQ: %s", row.id, row.event_id, reason)
        return sendable

    async def _record_failure(self, rows: list[ClaimedRow], error: str) -> None:
        try:
            async with self._engine.begin() as connection:
                await store.record_failure(connection, [r.id for r in rows], error)
        except Exception:  # the database may be what failed; the rows stay unpublished anyway
            log.exception("Could not record the failed attempt on %d outbox rows", len(rows))
        self._metrics.outbox_publish_errors.inc(len(rows))

    def _on_failure(self, partition: int, exc: BaseException) -> None:
        failures = self._failures.get(partition, 0) + 1
        self._failures[partition] = failures
        delay = backoff_delay(
            failures,
            self._settings.outbox_retry_backoff_ms / 1000,
            self._settings.outbox_retry_backoff_max_ms / 1000,
        )
        self._retry_at[partition] = time.monotonic() + delay
        self.last_error = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, CircuitOpenError):
            self._breaker.record_failure(exc)
        kind = "connection error" if _is_connection_error(exc) else "publish error"
        log.warning(
            "Kafka %s relaying outbox partition %d (attempt %d, retry in %.2fs): %s",
            kind,
            partition,
            failures,
            delay,
            self.last_error,
        )

    def _note_published(self, count: int) -> None:
        now = time.monotonic()
        self.last_success_at = now
        if count:
            self._metrics.outbox_published.inc(count)
            self._published_log.append((now, count))
        while self._published_log and self._published_log[0][0] < now - RATE_WINDOW_S:
            self._published_log.popleft()

    def publish_rate(self) -> float:
        """Rows per second over the last minute (or since start, if shorter)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._published_log if t >= now - RATE_WINDOW_S]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(1.0, min(RATE_WINDOW_S, now - recent[0][0]))

    async def backlog(self) -> BacklogStats:
        async with self._engine.connect() as connection:
            stats = await store.backlog_stats(connection)
        self._metrics.outbox_backlog.set(stats.backlog)
        self._metrics.outbox_oldest_age.set(stats.oldest_age_s or 0.0)
        self._metrics.outbox_rate.set(self.publish_rate())
        return stats

    async def prune(self) -> int:
        """Deletes published rows older than OUTBOX_RETENTION, one bounded batch at a time."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self._settings.outbox_retention)
        deleted = 0
        while True:
            async with self._engine.begin() as connection:
                count = await store.delete_published_before(
                    connection, cutoff, self._settings.outbox_retention_batch
                )
            deleted += count
            if count < self._settings.outbox_retention_batch:
                return deleted
            await asyncio.sleep(0)


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, KafkaConnectionError | OSError | asyncio.TimeoutError) or (
        "connect" in str(exc).lower()
    )
