"""Metrics: the consumer-lag samples follow the partitions a worker holds."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from holdwall_stream.observability.metrics import Metrics


def _lag_samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.labels["topic"], sample.labels["partition"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "kafka_consumer_lag"
        for sample in family.samples
    }


def test_lag_of_a_partition_handed_away_is_no_longer_exposed() -> None:
    metrics = Metrics()
    metrics.set_consumer_lag([("events", 0, 5000), ("events", 1, 7)])
    assert _lag_samples(metrics) == {("events", "0"): 5000, ("events", "1"): 7}

    metrics.set_consumer_lag([("events", 1, 3), ("events", 2, 0)])  # after a rebalance

    assert _lag_samples(metrics) == {("events", "1"): 3, ("events", "2"): 0}


def test_a_worker_holding_nothing_exposes_no_lag() -> None:
    metrics = Metrics()
    metrics.set_consumer_lag([("events", 0, 12)])
    metrics.set_consumer_lag([])
    assert _lag_samples(metrics) == {}


def test_the_same_partition_in_two_topics_is_two_samples() -> None:
    metrics = Metrics()
    metrics.set_consumer_lag([("events", 0, 1), ("other", 0, 2)])
    metrics.set_consumer_lag([("other", 0, 4)])
    assert _lag_samples(metrics) == {("other", "0"): 4}
