"""A real Prometheus scraping a real worker with deploy/prometheus/alerts.yml loaded.

promtool's unit tests (tests/deploy) check the rules on made-up series; this checks them
on what a worker really exposes: the scrape works, every rule evaluates without error, a
healthy worker raises no alert, and a dead-lettered message raises the one it should.
"""

from __future__ import annotations

import re
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.prometheus import JOB, PrometheusServer, promtool
from tests.support.worker_env import post_json, worker_env

pytestmark = pytest.mark.e2e

EVENTS = 5


async def test_prometheus_scrapes_a_worker_and_alerts_on_a_dead_letter(
    kafka_bootstrap: str, pg_database_url: str, tmp_path: Path
) -> None:
    env = worker_env(kafka_bootstrap, pg_database_url)
    with WorkerProcess(env, tmp_path / "worker") as worker:
        await worker.wait_for_http_async("/api/health", timeout=90, status={200})
        with urllib.request.urlopen(f"{worker.base_url}/api/metrics", timeout=10) as response:
            exposition = response.read()
        linted = promtool("check", "metrics", stdin=exposition)
        assert linted.returncode == 0, linted.stdout + linted.stderr

        target = f"127.0.0.1:{worker.web_port}"
        with PrometheusServer(tmp_path / "prometheus", [target]) as prometheus:
            await prometheus.wait_for(f'up{{job="{JOB}"}}', 1, timeout=60)
            assert prometheus.value("kafka_enabled") == 1

            events = [
                {"type": "order.created", "aggregate_id": f"order-{i}", "data": {"n": i}}
                for i in range(EVENTS)
            ]
            status, body = post_json(f"{worker.base_url}/api/events", events)
            assert status == 201, body
            await prometheus.wait_for("sum(kafka_outbox_published_total)", EVENTS)
            await prometheus.wait_for("sum(pipeline_events_consumed_total)", EVENTS)
            # Lag is measured every LAG_REFRESH_INTERVAL_MS: wait for a sample after the
            # events were consumed, then nothing may be pending or firing.
            await wait_until_async(
                lambda: prometheus.value("sum(kafka_consumer_lag)") == 0,
                timeout=30,
                message="consumer lag back to 0",
            )
            await _rules_evaluated(prometheus)
            assert prometheus.alerts() == [], "a healthy worker raised alerts"

            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(env["KAFKA_EVENTS_TOPIC"], b"{not json", key=b"k")
            finally:
                await producer.stop()

            def firing() -> list[dict[str, str]]:
                return [
                    alert["labels"] for alert in prometheus.alerts() if alert["state"] == "firing"
                ]

            labels = await wait_until_async(firing, timeout=60, message="an alert firing")
            assert labels == [
                {
                    "alertname": "HoldwallEventsDeadLettered",
                    "reason": "not_json",
                    "severity": "warning",
                }
            ], prometheus.log_text()[-2000:]
            await _rules_evaluated(prometheus)


async def _rules_evaluated(prometheus: PrometheusServer) -> None:
    """Every rule has been evaluated since now (so alerts reflect the series as they are
    now), and none failed (e.g. on a label clash)."""
    now = float(prometheus.api("query", query="time()")["result"][1])

    def evaluated() -> list[dict[str, Any]]:
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        return rules if all(_epoch(rule["lastEvaluation"]) > now for rule in rules) else []

    rules = await wait_until_async(evaluated, timeout=30, message="rules evaluated")
    assert len(rules) >= 10
    failed = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not failed, failed


def _epoch(rfc3339: str) -> float:
    """Prometheus' timestamps (nanoseconds, Z) as epoch seconds."""
    match = re.fullmatch(r"(.+?)(?:\.(\d+))?Z", rfc3339)
    assert match, rfc3339
    whole = datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC)
    return whole.timestamp() + float(f"0.{match.group(2) or 0}")
