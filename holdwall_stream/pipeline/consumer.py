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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from mode import Service

from holdwall_stream.messaging.client import kafka_client_options
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.pipeline.processor import EventProcessor, IncomingMessage
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)

FETCH_MAX_RECORDS = 5000
FETCH_TIMEOUT_MS = 200
# Tansu holds an empty fetch for the whole wait; keep it short so new events flow fast.
FETCH_MAX_WAIT_MS = 50


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
        async with self._consumer.batch_lock:
            log.info("Pipeline partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("Pipeline partitions assigned: %s", sorted(tp.partition for tp in assigned))
        self._consumer.on_assignment()


class PipelineConsumer(Service):
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
        self._consumer: AIOKafkaConsumer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self.events_consumed = 0
        self.last_batch_at: float | None = None

    def assigned_partitions(self) -> set[int]:
        if self._consumer is None:
            return set()
        return {tp.partition for tp in self._consumer.assignment()}

    async def on_start(self) -> None:
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
                    await self._process(consumer, fetched)
            except asyncio.CancelledError:
                raise
            except KafkaError as exc:
                self._metrics.kafka_connection_errors.inc()
                log.warning("Kafka connection error in the pipeline consumer: %r", exc)
                await asyncio.sleep(1.0)
            except Exception:
                # The batch is not committed: it is fetched again and deduplicated by id.
                log.exception("Pipeline batch failed; it will be redelivered")
                await asyncio.sleep(1.0)

    async def _process(self, consumer: AIOKafkaConsumer, fetched: dict) -> None:  # type: ignore[type-arg]
        async with self.batch_lock:
            owned = consumer.assignment()
            batches = {tp: records for tp, records in fetched.items() if tp in owned}
            if not batches:
                return
            messages = [
                IncomingMessage(
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    key=record.key,
                    value=record.value,
                    headers=list(record.headers or ()),
                )
                for records in batches.values()
                for record in records
            ]
            await self._processor.process(messages)
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                log.warning("Pipeline offset commit lost to a rebalance (%s); deduped later", exc)
                return
            self._committed.update(offsets)
            self.events_consumed += len(messages)
            self.last_batch_at = time.monotonic()

    async def lag(self) -> list[LagSample]:
        """End minus committed offset for every partition this worker holds."""
        consumer = self._consumer
        if consumer is None:
            return []
        samples = []
        for tp in sorted(consumer.assignment(), key=lambda tp: tp.partition):
            end = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if committed is None:
                committed = await consumer.committed(tp) or 0
                self._committed[tp] = committed
            if end is None:
                end = committed
            samples.append(LagSample(tp.topic, tp.partition, end, committed))
        return samples
