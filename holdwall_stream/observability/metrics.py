"""Prometheus metrics of one worker, on a registry of its own (served by /api/metrics)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from holdwall_stream.messaging.dead_letter import DEAD_LETTER_REASONS

# The `_created` timestamps double the exposition for no operational value.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Write-to-acknowledge: fine below 100 ms, where a low-latency relay's p99 lives.
DELAY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
BATCH_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
# What POST /api/events refuses with: bad JSON, too large, invalid events, a bug, no database.
API_REFUSAL_STATUSES = (400, 413, 422, 500, 503)


class Metrics:
    """The checklist's base names (kafka_connections, kafka_outbox_published, ...) and ours."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.kafka_enabled = Gauge(
            "kafka_enabled",
            "1 if KAFKA_ENABLED is true; 0 while Kafka is switched off (the outbox accumulates)",
            registry=r,
        )
        self.kafka_partitions = Gauge(
            "kafka_partitions",
            "KAFKA_PARTITIONS: partitions of the events topic, each held by one worker",
            registry=r,
        )
        self.database_up = Gauge(
            "database_up",
            "1 if the database answered this worker's last check (every /api/metrics and "
            "/api/health request) within 5 s, else 0",
            registry=r,
        )
        self.kafka_connections = Counter(
            "kafka_connections", "Kafka client connections established", registry=r
        )
        self.kafka_connection_errors = Counter(
            "kafka_connection_errors", "Kafka connection attempts that failed", registry=r
        )
        self.outbox_published = Counter(
            "kafka_outbox_published", "Outbox rows published to Kafka", registry=r
        )
        self.outbox_publish_errors = Counter(
            "kafka_outbox_publish_errors", "Outbox rows whose publish attempt failed", registry=r
        )
        self.outbox_dead_lettered = Counter(
            "kafka_outbox_dead_lettered", "Outbox rows sent to the DLQ instead", registry=r
        )
        self.outbox_backlog = Gauge(
            "kafka_outbox_backlog", "Outbox rows not yet published", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "kafka_outbox_oldest_unpublished_age_seconds",
            "Age of the oldest unpublished outbox row",
            registry=r,
        )
        self.outbox_rate = Gauge(
            "kafka_outbox_publish_rate", "Outbox rows published per second, last minute", registry=r
        )
        self.outbox_batch_size = Histogram(
            "kafka_outbox_batch_size", "Rows per relayed batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.outbox_publish_latency = Histogram(
            "kafka_outbox_publish_latency_seconds",
            "Produce-to-acknowledge time of a relayed batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_relay_delay = Histogram(
            "kafka_outbox_relay_delay_seconds",
            "Per relayed batch, from its oldest row's write (the writing transaction's start, "
            "database clock) to the broker's acknowledgement",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "kafka_circuit_breaker_state",
            "Kafka circuit breaker: 0 closed, 1 half-open, 2 open",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "kafka_consumer_lag",
            "End offset minus committed offset",
            ["topic", "partition"],
            registry=r,
        )
        self._lag_labels: set[tuple[str, str]] = set()
        self.events_consumed = Counter(
            "pipeline_events_consumed",
            "Events taken from the events topic and committed, whatever their outcome",
            registry=r,
        )
        self.events_processed = Counter(
            "pipeline_events_processed", "Events processed by the pipeline", ["type"], registry=r
        )
        self.events_duplicate = Counter(
            "pipeline_events_duplicate", "Events skipped as already processed", registry=r
        )
        self.events_unknown_type = Counter(
            "pipeline_events_unknown_type", "Events of a type with no handler", registry=r
        )
        self.events_retried = Counter(
            "pipeline_events_retried", "Handler attempts that failed and were retried", registry=r
        )
        self.dlq_sent = Counter(
            "dlq_messages_sent", "Messages sent to the dead-letter topic", ["reason"], registry=r
        )
        # Exposed at 0 from the start: Prometheus' increase() takes a series' first sample as
        # its baseline, so a reason first seen at 1 would never raise an alert.
        for reason in DEAD_LETTER_REASONS:
            self.dlq_sent.labels(reason=reason)
        self.dlq_stored = Counter(
            "dlq_messages_stored", "Dead letters stored in the dead_letters table", registry=r
        )
        self.dlq_replayed = Counter(
            "dlq_messages_replayed", "Dead letters replayed to the events topic", registry=r
        )
        self.events_accepted = Counter(
            "api_events_accepted", "Events stored through POST /api/events", registry=r
        )
        self.events_refused = Counter(
            "api_events_refused",
            "POST /api/events requests answered with an error, by HTTP status",
            ["status"],
            registry=r,
        )
        for status in API_REFUSAL_STATUSES:  # at 0 from the start, for increase()
            self.events_refused.labels(status=str(status))

    def set_breaker_state(self, state: str) -> None:
        self.breaker_state.set(BREAKER_STATE_VALUES[state])

    def set_consumer_lag(self, lags: Iterable[tuple[str, int, int]]) -> None:
        """Replaces every lag sample with ``(topic, partition, lag)`` of the partitions held.

        A partition handed to another worker drops out: its last lag would otherwise stay
        exposed by this worker, and alerting, for as long as the process runs.
        """
        current = {(topic, str(partition)): lag for topic, partition, lag in lags}
        for topic, partition in self._lag_labels - current.keys():
            self.consumer_lag.remove(topic, partition)
        for (topic, partition), lag in current.items():
            self.consumer_lag.labels(topic=topic, partition=partition).set(lag)
        self._lag_labels = set(current)
