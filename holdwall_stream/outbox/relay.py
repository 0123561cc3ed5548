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
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.producer.message_accumulator import BatchBuilder
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from holdwall_stream.db.deadline import stall_deadline
from holdwall_stream.db.errors import describe, is_database_unavailable
from holdwall_stream.errors import CircuitOpenError, DatabaseStalledError
from holdwall_stream.messaging.dead_letter import DeadLetterInfo
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox import store
from holdwall_stream.outbox.backlog import CachedBacklog
from holdwall_stream.outbox.batches import TooLarge, record_batches
from holdwall_stream.outbox.store import BacklogStats, ClaimedRow
from holdwall_stream.resilience.backoff import backoff_delay
from holdwall_stream.resilience.breaker import CircuitBreaker
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
# How long one drain() pass keeps taking batches from a partition with a backlog before it
# returns (and the caller re-reads which partitions it owns).
DRAIN_BUDGET_S = 1.0


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
        # SQLite has one writer at a time: its partitions are relayed one after the other.
        self._one_writer = asyncio.Lock()
        self._held: dict[int, _HeldConnection] = {}
        self._failures: dict[int, int] = {}
        self._retry_at: dict[int, float] = {}
        self._published_log: deque[tuple[float, int]] = deque()
        self._backlog = CachedBacklog(self._count_backlog)
        # Claim, produce (bounded by KAFKA_REQUEST_TIMEOUT) and mark: longer than this, and
        # PostgreSQL has stopped answering on a connection the kernel still sees alive.
        stall_limit_s = settings.database_stall_limit_s
        self._stalled_after_s = (
            None if stall_limit_s is None else settings.kafka_request_timeout / 1000 + stall_limit_s
        )
        self.last_error: str | None = None
        self.last_success_at: float | None = None

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def prepare(self) -> None:
        async with self._engine.begin() as connection:
            await store.ensure_relay_locks(connection, self._settings.kafka_partitions)

    @asynccontextmanager
    async def holding_connection(self, partition: int) -> AsyncIterator[None]:
        """Inside, the partition's batches reuse one database connection (no pool checkout
        and liveness ping per batch); it goes back to the pool at the end, or is dropped
        after a failed batch. Re-entrant."""
        if partition in self._held:
            yield
            return
        held = self._held[partition] = _HeldConnection(self._engine)
        try:
            yield
        finally:
            del self._held[partition]
            await held.close()

    async def drain(self, partitions: Collection[int]) -> bool:
        """Relays what is waiting in ``partitions``; True if a partition has more right now.

        On PostgreSQL the partitions are drained concurrently, each on its own connection
        and each batch after batch for up to DRAIN_BUDGET_S, so one partition's Kafka round
        trip overlaps another's claim. SQLite has one writer: one batch per partition, and
        concurrent calls take turns.
        """
        if not self._parallel:
            more_any = False
            for partition in partitions:
                async with self._one_writer:
                    more_any |= await self._drain_partition(partition)
            return more_any
        deadline = time.monotonic() + DRAIN_BUDGET_S
        results = await asyncio.gather(
            *(self._drain_partition_until(p, deadline) for p in partitions),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return any(results)

    async def _drain_partition_until(self, partition: int, deadline: float) -> bool:
        async with self.holding_connection(partition):
            while await self._drain_partition(partition):
                if time.monotonic() >= deadline:
                    return True
            return False

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
        """One transaction: claim a batch, produce it, commit once the broker acknowledged it.

        Returns the number of rows claimed (a full batch means there may be more). One
        claim per transaction: a further claim in the same transaction would walk past the
        index entries of the rows this one marked (they only become skippable once it
        commits), which measured slower than committing and claiming afresh. The other
        partitions' batches keep the database busy meanwhile.
        """
        producer = await self._producer.get()
        claimed: list[ClaimedRow] = []
        sent = 0
        held = self._held.get(partition)
        try:
            async with (
                stall_deadline(
                    self._engine,
                    self._stalled_after_s,
                    f"a relay batch of outbox partition {partition} (claim, produce, mark)",
                    "KAFKA_REQUEST_TIMEOUT + DATABASE_TIMEOUT_MS",
                ),
                held.use() if held else self._engine.connect() as connection,
                connection.begin(),
            ):
                started = time.perf_counter()
                claimed = await store.claim_batch(
                    connection, partition, self._settings.outbox_batch_size
                )
                if not claimed:  # nothing to send, or another worker holds the partition
                    return 0
                batches, too_large = record_batches(
                    producer.create_batch, claimed, self._settings.kafka_max_message_bytes
                )
                await self._dead_letter(connection, partition, too_large)
                sender = _PartitionSender(
                    producer,
                    self._settings.kafka_events_topic,
                    partition,
                    self._settings.kafka_request_timeout / 1000,
                )
                for batch in batches:
                    await sender.send(batch)
                await sender.finish()
                sent = len(claimed) - len(too_large)
                self._metrics.outbox_publish_latency.observe(time.perf_counter() - started)
                oldest = store.oldest_written_at(claimed)
                self._metrics.outbox_relay_delay.observe(max(0.0, time.time() - oldest))
        except DatabaseStalledError:
            raise  # recording the failure would wait on the same database
        except Exception as exc:
            if claimed:
                await self._record_failure(claimed, f"{type(exc).__name__}: {exc}")
            raise
        self._note_published(sent)
        self._metrics.outbox_batch_size.observe(len(claimed))
        return len(claimed)

    async def _dead_letter(
        self, connection: AsyncConnection, partition: int, too_large: list[TooLarge]
    ) -> None:
        """A row larger than the broker accepts would block its key forever: park it."""
        limit = self._settings.kafka_max_message_bytes
        for parked in too_large:
            row_id, event_id, key, _payload, _headers, attempts, _written_at = parked.row
            reason = (
                f"message of {parked.batch_bytes} bytes (as a record batch of its own) "
                f"exceeds KAFKA_MAX_MESSAGE_BYTES={limit}"
            )
            now = datetime.now(UTC)
            info = DeadLetterInfo(
                source="outbox",
                reason="too_large",
                error_type="MessageSizeTooLarge",
                error_message=reason,
                attempts=attempts + 1,
                first_failure_at=now,
                last_failure_at=now,
                event_id=event_id.decode(),
                original_topic=self._settings.kafka_events_topic,
                original_partition=partition,
            )
            # The DLQ has the same size limit: the payload stays in the outbox row.
            await self._producer.send(
                self._settings.kafka_dlq_topic, None, key=key, headers=info.headers()
            )
            await store.mark_dead_lettered(connection, row_id, reason)
            self._metrics.outbox_dead_lettered.inc()
            self._metrics.dlq_sent.labels(reason="too_large").inc()
            log.error("Outbox row %d (event %s) sent to the DLQ: %s", row_id, info.event_id, reason)

    async def _record_failure(self, rows: list[ClaimedRow], error: str) -> None:
        try:
            async with self._engine.begin() as connection:
                await store.record_failure(connection, store.row_ids(rows), error)
        except Exception as exc:  # the database may be what failed; the rows stay unpublished
            if not is_database_unavailable(exc):
                log.exception("Could not record the failed attempt on %d outbox rows", len(rows))
            else:
                log.warning(
                    "Could not record the failed attempt on %d outbox rows: %s",
                    len(rows),
                    describe(exc),
                )
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
        """The backlog figures, recounted as often as their cost allows (outbox.backlog)."""
        stats = await self._backlog.get()
        self._metrics.outbox_backlog.set(stats.backlog)
        self._metrics.outbox_oldest_age.set(stats.oldest_age_s or 0.0)
        self._metrics.outbox_rate.set(self.publish_rate())
        return stats

    async def stop_counting(self) -> None:
        """Cancels a backlog count in progress; for shutdown."""
        await self._backlog.cancel()

    def backlog_age_s(self) -> float | None:
        """Seconds since the figures :meth:`backlog` returns were counted."""
        return self._backlog.age_s()

    async def _count_backlog(self) -> BacklogStats:
        async with self._engine.connect() as connection:
            return await store.backlog_stats(connection)

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


class _HeldConnection:
    """A connection kept across a partition's batches; replaced after any failure."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None

    @asynccontextmanager
    async def use(self) -> AsyncIterator[AsyncConnection]:
        if self._connection is None or self._connection.closed:
            self._connection = await self._engine.connect()
        try:
            yield self._connection
        except BaseException:
            await self.close()  # its state is unknown: never reuse it
            raise

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close()
            except Exception:
                log.debug("Closing a relay connection failed", exc_info=True)


class _PartitionSender:
    """Sends record batches in order to one partition, one batch in flight.

    Before a record batch is handed to the producer, the previous one must have been
    acknowledged: were an earlier batch to fail (its delivery timed out) while a later one
    was already queued, the later one would land on the topic ahead of the earlier rows'
    retry. (A claim of OUTBOX_BATCH_SIZE rows usually fits one record batch.)
    """

    def __init__(
        self, producer: AIOKafkaProducer, topic: str, partition: int, timeout_s: float
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._partition = partition
        self._timeout_s = timeout_s
        self._in_flight: asyncio.Future[object] | None = None

    async def send(self, batch: BatchBuilder) -> None:
        """Hands ``batch`` (closed) to the producer once the one before it was acknowledged."""
        await self.finish()
        self._in_flight = await self._producer.send_batch(
            batch, self._topic, partition=self._partition
        )

    async def finish(self) -> None:
        """Waits until the batch in flight (if any) is acknowledged; raises if it failed."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            await asyncio.wait_for(in_flight, self._timeout_s)


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, KafkaConnectionError | OSError | asyncio.TimeoutError) or (
        "connect" in str(exc).lower()
    )
