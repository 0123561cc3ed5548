"""The whole path in real processes: HTTP -> events + outbox -> relay -> topic -> pipeline."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import WorkerProcess, wait_until_async
from tests.support.worker_env import consume_all, get_json, post_json, query, worker_env

pytestmark = pytest.mark.e2e


async def test_posted_events_reach_topic_pipeline_and_are_marked_published(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    env = worker_env(kafka_bootstrap, database_url)
    with WorkerProcess(env, tmp_path / "worker") as worker:
        await worker.wait_for_http_async("/api/health", timeout=90, status={200})
        status, health = get_json(f"{worker.base_url}/api/health")
        assert status == 200, health
        assert health["checks"]["kafka"]["status"] == "ok"
        assert health["event_loop"] == "uvloop", "the worker runs on uvloop by default"

        events = [
            {"type": "order.created", "aggregate_id": f"order-{i % 3}", "data": {"n": i}}
            for i in range(12)
        ]
        status, body = post_json(f"{worker.base_url}/api/events", events)
        assert status == 201, body
        ids = body["ids"]
        assert len(ids) == 12

        records = await consume_all(kafka_bootstrap, env["KAFKA_EVENTS_TOPIC"], expected=12)
        by_id = {dict(r.headers)["event-id"].decode(): r for r in records}
        assert set(by_id) == set(ids)
        for event, event_id in zip(events, ids, strict=True):
            assert by_id[event_id].key == event["aggregate_id"].encode()

        async def all_processed() -> bool:
            rows = await query(database_url, "SELECT event_id FROM processed_events")
            return {str(uuid.UUID(str(r[0]))) for r in rows} >= set(ids)

        await wait_until_async(all_processed, timeout=60, message="events processed")
        published = await query(database_url, "SELECT published FROM outbox")
        assert len(published) == 12
        assert all(row[0] for row in published)

        # The relay delay (write to broker acknowledgement) was observed for those batches,
        # on the same clock as the database's, so it is small and never negative.
        with urllib.request.urlopen(f"{worker.base_url}/api/metrics", timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        delay = {s.name: s.value for s in families["kafka_outbox_relay_delay_seconds"].samples}
        assert delay["kafka_outbox_relay_delay_seconds_count"] >= 1
        assert (
            0
            < delay["kafka_outbox_relay_delay_seconds_sum"]
            < 60 * delay["kafka_outbox_relay_delay_seconds_count"]
        )
