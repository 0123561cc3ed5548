"""The JSON form of /api/metrics (?format=json), with the checklist's top-level `kafka` object."""

from __future__ import annotations

from typing import Any

from holdwall_stream.observability.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, Any]:
    """Every sample of the registry: name -> value, or name -> [{labels, value}] if labelled."""
    values: dict[str, Any] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if sample.labels:
                values.setdefault(sample.name, []).append(
                    {"labels": sample.labels, "value": sample.value}
                )
            else:
                values[sample.name] = sample.value
    return values


def metrics_as_json(metrics: Metrics) -> dict[str, Any]:
    samples = _samples(metrics)
    kafka = {
        "enabled": samples.get("kafka_enabled", 0),
        "connections": samples.get("kafka_connections_total", 0),
        "connection_errors": samples.get("kafka_connection_errors_total", 0),
        "outbox_published": samples.get("kafka_outbox_published_total", 0),
        "outbox_publish_errors": samples.get("kafka_outbox_publish_errors_total", 0),
        "outbox_dead_lettered": samples.get("kafka_outbox_dead_lettered_total", 0),
        "outbox_backlog": samples.get("kafka_outbox_backlog", 0),
        "outbox_oldest_unpublished_age_seconds": samples.get(
            "kafka_outbox_oldest_unpublished_age_seconds", 0
        ),
        "outbox_publish_rate": samples.get("kafka_outbox_publish_rate", 0),
        "circuit_breaker_state": samples.get("kafka_circuit_breaker_state", 0),
        "consumer_lag": samples.get("kafka_consumer_lag", []),
    }
    return {"kafka": kafka, "metrics": samples}
