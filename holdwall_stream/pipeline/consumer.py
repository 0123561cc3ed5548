"""The events agent's consumer: whole fetched batches from aiokafka into the processor.

Faust's stream iteration costs about 200 µs per message here (4,000-4,700 msg/s, also
with ``take``), which caps a worker far below the 20,000 events/s the pipeline must do.
So the pipeline reads the events topic with aiokafka's ``getmany`` (about 217,000 msg/s)
in its own consumer group, ``<KAFKA_GROUP_ID>.pipeline``, runs inside the Faust worker as
a service, and commits offsets only after a batch's effects are committed. Faust keeps
the agents where its per-message path is cheap enough: dead letters, lag, breaker state.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from mode import Service

from holdwall_stream.db.errors import describe, is_database_unavailable
from holdwall_stream.messaging.client import kafka_client_options
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.observability.outage_log import OutageLog
from holdwall_stream.pipeline.processor import EventProcessor, PreparedBatch
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)

FETCH_MAX_RECORDS = 10000
FETCH_TIMEOUT_MS = 200
# Tansu holds an empty fetch for the whole wait; keep it short so new events flow fast.
FETCH_MAX_WAIT_MS = 50
# Messages parsed between two yields to the event loop (about 5 ms of parsing).
PREPARE_SLICE = 1000
# Per partition per fetch: a whole FETCH_MAX_RECORDS batch of ~300-byte events fits.
MAX_PARTITION_FETCH_BYTES = 4 * 1024 * 1024


def pipeline_group_id(settings: Settings) -> str:
    return f"{settings.kafka_group_id}.pipeline"


@dataclass(frozen=True)
class LagSample:
    topic: str
    partition: int
    end_offset: int
    committed_offset: int

    @property
    def lag(self) -> int:
        # Tansu's reported end can trail the true end; never report negative lag.
        return max(0, self.end_offset - self.committed_offset)


class _FinishBatchBeforeRevoke(ConsumerRebalanceListener):
    """Waits for the batch in flight (and its commit) before partitions move away."""

    def __init__(self, consumer: PipelineConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._consumer.awaiting_assignment = True
        async with self._consumer.batch_lock:
            await self._consumer.settle(rewind=False)
            log.info("Pipeline partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("Pipeline partitions assigned: %s", sorted(tp.partition for tp in assigned))
        # Another worker may have committed these partitions since this one last held them.
        self._consumer.forget_committed()
        self._consumer.awaiting_assignment = False
        self._consumer.on_assignment()


Batches = dict[TopicPartition, list[ConsumerRecord]]  # type: ignore[type-arg]


class PipelineConsumer(Service):
    """Fetch, parse and apply overlap: while batch N's transaction runs in the database,
    batch N+1 is fetched and parsed. Batches are applied one at a time, in fetch order, and
    each one's offsets are committed after its effects, so order per key holds and a crash
    redelivers (deduplicated) what was not committed."""

    def __init__(
        self,
        settings: Settings,
        processor: EventProcessor,
        metrics: Metrics,
        on_assignment: Callable[[], None] = lambda: None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._settings = settings
        self._processor = processor
        self._metrics = metrics
        self.on_assignment = on_assignment
        self.batch_lock = asyncio.Lock()
        self._database_outage = OutageLog(log, "Pipeline: database")
        self._consumer: AIOKafkaConsumer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._fetched_end: dict[TopicPartition, int] = {}
        # Fetched but not yet committed, oldest first: where to rewind to after a failure.
        self._uncommitted: list[Batches] = []
        self._in_flight: asyncio.Future[None] | None = None
        self.events_consumed = 0
        self.last_batch_at: float | None = None
        # Until the group hands out partitions (at start, and in each rebalance) this worker
        # neither processes nor relays: health says "joining" rather than "ok".
        self.awaiting_assignment = True

    def assigned_partitions(self) -> set[int]:
        if self._consumer is None:
            return set()
        return {tp.partition for tp in self._consumer.assignment()}

    async def on_start(self) -> None:
        # The worker's start-up objects (modules, app, clients) live as long as the process:
        # moved out of the collector's reach, full collections no longer walk them, which
        # halves the cost of parsing a batch (its envelopes trigger collections).
        gc.freeze()
        session_ms = self._settings.kafka_session_timeout
        options = kafka_client_options(self._settings)
        options["client_id"] = f"{self._settings.kafka_group_id}-pipeline"
        self._consumer = AIOKafkaConsumer(
            **options,
            group_id=pipeline_group_id(self._settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=FETCH_MAX_RECORDS,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            rebalance_timeout_ms=max(session_ms, 30_000),
        )
        self._consumer.subscribe(
            [self._settings.kafka_events_topic], listener=_FinishBatchBeforeRevoke(self)
        )
        await self._consumer.start()
        self._metrics.kafka_connections.inc()

    async def on_stop(self) -> None:
        if self._consumer is not None:
            async with self.batch_lock:
                await self.settle(rewind=False)
                consumer, self._consumer = self._consumer, None
            await consumer.stop()

    @Service.task
    async def _consume(self) -> None:
        while not self.should_stop:
            consumer = self._consumer
            if consumer is None:
                await asyncio.sleep(0.1)
                continue
            try:
                fetched = await consumer.getmany(
                    timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS
                )
                if fetched:
                    await self._submit(consumer, fetched)
                elif self._in_flight is not None:
                    async with self.batch_lock:
                        await self._finish_in_flight()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                async with self.batch_lock:
                    await self.settle(rewind=True)
                # Not committed: fetched again and deduplicated by id.
                if isinstance(exc, KafkaError):
                    self._metrics.kafka_connection_errors.inc()
                    log.warning("Kafka connection error in the pipeline consumer: %r", exc)
                else:
                    self._batch_failed(exc)
                await asyncio.sleep(1.0)

    def _batch_failed(self, exc: Exception) -> None:
        """Logs a failed batch (redelivered: its offsets were not committed); a database
        outage once, not with a traceback per retry."""
        if is_database_unavailable(exc):
            self._database_outage.failed(describe(exc))
        else:
            log.error("Pipeline batch failed; it will be redelivered", exc_info=exc)

    async def _submit(self, consumer: AIOKafkaConsumer, fetched: Batches) -> None:
        async with self.batch_lock:
            owned = consumer.assignment()
            batches = {tp: records for tp, records in fetched.items() if tp in owned and records}
            if not batches:
                return
            self._uncommitted.append(batches)
            for tp, records in batches.items():
                self._fetched_end[tp] = records[-1].offset + 1
            # ConsumerRecords go to the processor as they are: no per-message copy.
            messages = [record for records in batches.values() for record in records]
            prepared = PreparedBatch()
            for start in range(0, len(messages), PREPARE_SLICE):
                self._processor.prepare(messages[start : start + PREPARE_SLICE], into=prepared)
                # Parsing is CPU work on the loop: let the batch in flight read its
                # database answers and commit meanwhile, so the database is not kept idle.
                await asyncio.sleep(0)
            await self._finish_in_flight()
            self._in_flight = asyncio.ensure_future(self._apply(consumer, prepared, batches))

    async def _apply(
        self, consumer: AIOKafkaConsumer, prepared: PreparedBatch, batches: Batches
    ) -> None:
        await self._processor.apply(prepared)
        self._database_outage.succeeded()
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
        try:
            await consumer.commit(offsets)
        except CommitFailedError as exc:
            log.warning("Pipeline offset commit lost to a rebalance (%s); deduped later", exc)
        else:
            self._committed.update(offsets)
        self._uncommitted = [b for b in self._uncommitted if b is not batches]
        self.events_consumed += len(prepared)
        self._metrics.events_consumed.inc(len(prepared))
        self.last_batch_at = time.monotonic()

    async def _finish_in_flight(self) -> None:
        """Waits for the batch being applied; raises what it raised."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            await in_flight

    async def settle(self, *, rewind: bool) -> None:
        """Lets the batch in flight finish (a failure is logged), then forgets the batches
        fetched but not committed; with ``rewind``, seeks back to the first of them, since
        getmany has moved past them and the next commit would skip them otherwise. Called
        with ``batch_lock`` held."""
        try:
            await self._finish_in_flight()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._batch_failed(exc)
        uncommitted, self._uncommitted = self._uncommitted, []
        consumer = self._consumer
        if not rewind or consumer is None:
            return
        owned = consumer.assignment()
        first: dict[TopicPartition, int] = {}
        for batches in uncommitted:
            for tp, records in batches.items():
                first.setdefault(tp, records[0].offset)
        for tp, offset in first.items():
            if tp in owned:
                consumer.seek(tp, offset)

    def forget_committed(self) -> None:
        """Committed offsets are read from the group again on the next lag sample."""
        self._committed.clear()
        self._fetched_end.clear()

    async def lag(self) -> list[LagSample]:
        """End minus committed offset for every partition this worker holds."""
        consumer = self._consumer
        if consumer is None:
            return []
        samples = []
        for tp in sorted(consumer.assignment(), key=lambda tp: tp.partition):
            committed = self._committed.get(tp)
            if committed is None:
                committed = await consumer.committed(tp) or 0
                # A batch committed meanwhile knows better.
                committed = self._committed.setdefault(tp, committed)
            # Tansu's high-water mark can trail the true end (the start of the last batch
            # + 1); what this consumer has fetched is a floor for it.
            end = max(consumer.highwater(tp) or 0, self._fetched_end.get(tp, 0), committed)
            samples.append(LagSample(tp.topic, tp.partition, end, committed))
        return samples
