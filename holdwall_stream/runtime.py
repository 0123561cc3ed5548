"""The worker's long-lived parts, built once from the settings and handed to app wiring."""

from __future__ import annotations

from collections.abc import Callable

from holdwall_stream.db.engine import create_engine
from holdwall_stream.messaging.producer import KafkaProducer
from holdwall_stream.observability.metrics import Metrics
from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.writer import OutboxTarget
from holdwall_stream.pipeline.handlers import HandlerRegistry, handlers
from holdwall_stream.pipeline.processor import EventProcessor
from holdwall_stream.resilience.breaker import BreakerState, CircuitBreaker
from holdwall_stream.settings import Settings


class Runtime:
    def __init__(self, settings: Settings, registry: HandlerRegistry = handlers) -> None:
        self.settings = settings
        # Set by the app wiring once the relay service exists; the web view calls it.
        self.relay_wake: Callable[[], None] = lambda: None
        self.metrics = Metrics()
        self.metrics.kafka_enabled.set(int(settings.kafka_enabled))
        self.metrics.kafka_partitions.set(settings.kafka_partitions)
        self.engine = create_engine(settings)
        self.target = OutboxTarget(settings.kafka_events_topic, settings.kafka_partitions)
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold, settings.breaker_reset_timeout_ms / 1000
        )
        self.breaker.on_transition.append(self._on_breaker_transition)
        self.metrics.set_breaker_state(self.breaker.state.value)
        self.producer = KafkaProducer(settings, self.metrics)
        self.relay = OutboxRelay(settings, self.engine, self.producer, self.breaker, self.metrics)
        if settings.pipeline_handlers:
            registry.load_from_setting(settings.pipeline_handlers)
        self.registry = registry
        self.processor = EventProcessor(
            settings, self.engine, registry, self.producer, self.metrics
        )

    def _on_breaker_transition(
        self, _old: BreakerState, new: BreakerState, _snapshot: dict[str, object]
    ) -> None:
        self.metrics.set_breaker_state(new.value)

    async def close(self) -> None:
        await self.producer.stop()
        await self.engine.dispose()
