"""One acks=all aiokafka producer per worker, shared by the relay and the dead-letter path.

Faust's own ``topic.send`` goes message by message (about 3,000 msg/s here); the relay
needs aiokafka's batch API (``create_batch``/``send_batch``), so it has its own producer.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from holdwall_stream.messaging.client import kafka_client_options
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)

# Room for a produce request's framing around a record batch of KAFKA_MAX_MESSAGE_BYTES.
_REQUEST_OVERHEAD = 64 * 1024


def size_limits(settings: Settings) -> dict[str, int]:
    """aiokafka's batch and request size options for KAFKA_MAX_MESSAGE_BYTES.

    The broker's limit applies to a whole record batch: a fuller batch would be rejected
    on every retry (outbox/batches.py). A request adds its framing around the batch.
    """
    return {
        "max_batch_size": settings.kafka_max_message_bytes,
        "max_request_size": settings.kafka_max_message_bytes + _REQUEST_OVERHEAD,
    }


class KafkaProducer:
    """Starts the aiokafka producer on first use and again after a failed start."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                self._producer = await self._start()
        return self._producer

    async def _start(self) -> AIOKafkaProducer:
        options = kafka_client_options(self._settings)
        options["client_id"] = f"{self._settings.kafka_group_id}-relay"
        producer = AIOKafkaProducer(
            **options,
            acks="all",
            linger_ms=0,
            **size_limits(self._settings),
        )
        try:
            await producer.start()
        except KafkaError as exc:
            self._metrics.kafka_connection_errors.inc()
            log.error(
                "Kafka connection error: producer could not connect to %s: %r",
                ",".join(self._settings.bootstrap_servers),
                exc,
            )
            await producer.stop()
            raise KafkaConnectionError(f"cannot connect to Kafka: {exc!r}") from exc
        self._metrics.kafka_connections.inc()
        log.info("Kafka producer connected to %s", ",".join(self._settings.bootstrap_servers))
        return producer

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Sends one message and waits for the broker's acknowledgement."""
        producer = await self.get()
        await producer.send_and_wait(topic, value, key=key, headers=headers)

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()
