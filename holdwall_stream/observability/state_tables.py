"""RocksDB-backed Faust tables of consumer lag and circuit-breaker state.

Faust only lets an agent write a table (a timer or view raises "Cannot modify table key
from outside of stream iteration", faust issue #497), so a timer publishes samples to an
internal topic and an agent writes them. The tables are global: every worker holds every
key, so any worker's /api/health shows the whole group.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import faust

from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.pipeline.consumer import PipelineConsumer
from holdwall_stream.resilience.breaker import CircuitBreaker
from holdwall_stream.settings import Settings


class WorkerState:
    """Lag and breaker samples flowing timer -> topic -> agent -> table."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        pipeline: PipelineConsumer,
        breaker: CircuitBreaker,
        metrics: Metrics,
    ) -> None:
        self.worker_id = f"{socket.gethostname()}:{settings.web_port}"
        self._pipeline = pipeline
        self._breaker = breaker
        self._metrics = metrics
        self._last_breaker: dict[str, Any] | None = None
        self.lag_topic = app.topic(
            f"{settings.kafka_group_id}-consumer-lag",
            internal=True,
            partitions=1,
            key_serializer="json",
            value_serializer="json",
        )
        self.breaker_topic = app.topic(
            f"{settings.kafka_group_id}-circuit-breaker",
            internal=True,
            partitions=1,
            key_serializer="json",
            value_serializer="json",
        )
        # Tables take no serializer arguments (Service.__init__ rejects them); with no
        # key_type/value_type their changelog keys and values are JSON already.
        self.lag_table = app.GlobalTable("consumer-lag", default=None, partitions=1)
        self.breaker_table = app.GlobalTable("circuit-breaker", default=None, partitions=1)

        @app.agent(self.lag_topic, name="consumer-lag")
        async def record_lag(stream: faust.StreamT) -> None:
            async for key, sample in stream.items():
                self.lag_table[key] = sample

        @app.agent(self.breaker_topic, name="circuit-breaker")
        async def record_breaker(stream: faust.StreamT) -> None:
            async for key, snapshot in stream.items():
                self.breaker_table[key] = snapshot

        @app.timer(interval=settings.lag_refresh_interval_ms / 1000)
        async def publish_state() -> None:
            await self.publish()

    async def publish(self) -> None:
        now = time.time()
        samples = await self._pipeline.lag()
        self._metrics.set_consumer_lag((s.topic, s.partition, s.lag) for s in samples)
        for sample in samples:
            await self.lag_topic.send(
                key=f"{sample.topic}:{sample.partition}",
                value={
                    "topic": sample.topic,
                    "partition": sample.partition,
                    "end_offset": sample.end_offset,
                    "committed_offset": sample.committed_offset,
                    "lag": sample.lag,
                    "worker": self.worker_id,
                    "updated_at": now,
                },
            )
        snapshot = self._breaker.snapshot()
        snapshot.pop("retry_in_s", None)
        if snapshot != self._last_breaker:
            await self.breaker_topic.send(
                key=self.worker_id, value={**snapshot, "worker": self.worker_id, "updated_at": now}
            )
            self._last_breaker = snapshot

    def lag_view(self) -> dict[str, Any]:
        partitions = sorted(
            (value for value in self.lag_table.values() if value),
            key=lambda v: (v["topic"], v["partition"]),
        )
        return {"total": sum(p["lag"] for p in partitions), "partitions": partitions}

    def breakers_view(self) -> dict[str, Any]:
        return {key: value for key, value in self.breaker_table.items() if value}
