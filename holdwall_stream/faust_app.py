"""The Faust app: topics, agents, the relay timer, web views, startup checks.

`faust -A holdwall_stream worker` imports this module; settings are read once, here.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

import faust
from aiokafka.errors import KafkaError
from faust.app.base import BootStrategy
from mode import ServiceT

from holdwall_stream.db.deadline import stall_deadline
from holdwall_stream.db.errors import is_database_unavailable, unreachable
from holdwall_stream.db.schema import init_schema
from holdwall_stream.errors import (
    EXIT_BAD_SETTING,
    EXIT_DATABASE_UNAVAILABLE,
    EXIT_KAFKA_UNAVAILABLE,
    HandlerConfigError,
    SettingsError,
    TopicMismatchError,
)
from holdwall_stream.event_loop import running_loop_name, use_preferred_loop
from holdwall_stream.host_resources import claim_data_dir, ensure_web_port_free
from holdwall_stream.messaging.client import build_ssl_context
from holdwall_stream.messaging.topics import ensure_topics
from holdwall_stream.observability.state_tables import WorkerState
from holdwall_stream.outbox.service import RelayService
from holdwall_stream.pipeline.consumer import PipelineConsumer, pipeline_group_id
from holdwall_stream.pipeline.dlq import DlqMessage, store_dead_letters
from holdwall_stream.resilience.backoff import backoff_delay
from holdwall_stream.runtime import Runtime
from holdwall_stream.settings import Settings, load_settings
from holdwall_stream.verify import VerificationFailed, validate_or_raise
from holdwall_stream.web.views import register_views

log = logging.getLogger(__name__)
DLQ_BATCH = 1000
DLQ_BATCH_WITHIN_S = 0.05
DLQ_RETRY_BASE_S = 0.5
DLQ_RETRY_MAX_S = 30.0


class KafkaOffBootStrategy(BootStrategy):
    """KAFKA_ENABLED=false: web and timers only; no consumer, agents or tables."""

    enable_kafka = False

    def agents(self) -> Iterable[ServiceT]:
        return []

    def tables(self) -> Iterable[ServiceT]:
        return []


class HoldwallApp(faust.App):
    runtime: Runtime
    # Held open while the process lives: FAUST_DATA_DIR is this worker's alone.
    _data_dir_lock: int

    async def on_first_start(self) -> None:
        settings = self.runtime.settings
        try:
            ensure_web_port_free(settings)
            self._data_dir_lock = claim_data_dir(settings)
        except SettingsError as exc:
            _stop_worker(EXIT_BAD_SETTING, f"holdwall-stream: invalid setting: {exc}")
        await super().on_first_start()
        try:
            await init_schema(self.runtime.engine)
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            error = unreachable(settings, exc, then="start the worker again")
            _stop_worker(EXIT_DATABASE_UNAVAILABLE, f"{type(error).__name__}: {error}")
        if settings.kafka_enabled:
            await _declare_topics(settings)

    async def on_started(self) -> None:
        await super().on_started()
        log.info("Worker running on the %s event loop", running_loop_name())
        # What is alive once the worker runs (modules, Faust, the runtime) lives as long as
        # the process. Frozen, the collector never walks it again: full collections of it
        # measured 110-150 ms here, a pause every relay batch and pipeline batch would see.
        gc.freeze()

    async def on_stop(self) -> None:
        await super().on_stop()
        await self.runtime.close()


async def _declare_topics(settings: Settings) -> None:
    """Declares the topics and runs KAFKA_VALIDATE_ON_STARTUP's checks; a worker that
    cannot start on this cluster stops with one line saying what to do."""
    try:
        try:
            await ensure_topics(settings)
        except (KafkaError, OSError, TimeoutError) as exc:
            if settings.kafka_validate_on_startup:
                await validate_or_raise(settings)  # names the check that fails
            _stop_worker(
                EXIT_KAFKA_UNAVAILABLE,
                f"Kafka connection error: cannot declare topics on "
                f"{','.join(settings.bootstrap_servers)}: {exc!r}; start the brokers or "
                "correct KAFKA_BROKERS, then start the worker again (KAFKA_ENABLED=false runs "
                "it without Kafka: events are kept, the outbox accumulates)",
            )
        if settings.kafka_validate_on_startup:
            # After ensure_topics, so a fresh cluster's missing topics are not a failure.
            await validate_or_raise(settings)
    except TopicMismatchError as exc:  # a setting at odds with the cluster, not an outage
        _stop_worker(EXIT_BAD_SETTING, f"{type(exc).__name__}: {exc}")
    except VerificationFailed as exc:
        _stop_worker(EXIT_KAFKA_UNAVAILABLE, f"{type(exc).__name__}: {exc}")


def _stop_worker(exit_code: int, line: str) -> NoReturn:
    """Logs ``line`` and exits. Raised as an exception, mode would log it with a traceback
    of its own start-up machinery; SystemExit passes mode by."""
    log.error("%s", line)
    raise SystemExit(exit_code) from None


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    context = build_ssl_context(settings)
    if settings.sasl_enabled:
        assert settings.kafka_sasl_password is not None
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            mechanism=settings.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def create_app(settings: Settings) -> HoldwallApp:
    block_cache = settings.rocksdb_block_cache_mb * 1024 * 1024
    app = HoldwallApp(
        settings.kafka_group_id,
        broker=[f"kafka://{address}" for address in settings.bootstrap_servers],
        broker_credentials=broker_credentials(settings),
        broker_session_timeout=settings.kafka_session_timeout / 1000,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout / 3000),
        broker_request_timeout=settings.kafka_request_timeout / 1000,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        store="rocksdb://",
        # Faust refuses to recover a table whose RocksDB offset is past the changelog's
        # reported end; Tansu reports an end that can trail the true one (start of the last
        # batch + 1), so a restarted worker crashed with ConsistencyError instead of serving
        # its restored lag table. The tables hold observability state only.
        recovery_consistency_check=False,
        rocksdb_options={"block_cache_size": block_cache, "write_buffer_size": block_cache},
        datadir=str(settings.faust_data_dir),
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_enabled=True,
        autodiscover=False,
    )
    runtime = Runtime(settings)
    app.runtime = runtime
    if not settings.kafka_enabled:
        app.boot_strategy = KafkaOffBootStrategy(app)

    if not settings.kafka_enabled:
        register_views(app, runtime, lambda: {"status": "disabled", "rebalancing": False})
        return app

    dlq_topic = app.topic(
        settings.kafka_dlq_topic,
        partitions=settings.kafka_partitions,
        key_serializer="raw",
        value_serializer="raw",
    )

    pipeline = PipelineConsumer(settings, runtime.processor, runtime.metrics, loop=app.loop)
    worker_state = WorkerState(app, settings, pipeline, runtime.breaker, runtime.metrics)

    def consumer_state() -> dict[str, Any]:
        return {
            "status": "joining" if pipeline.awaiting_assignment else "ok",
            "group": pipeline_group_id(settings),
            "rebalancing": bool(app.rebalancing),
            "assigned_partitions": sorted(pipeline.assigned_partitions()),
            "events_consumed": pipeline.events_consumed,
            "lag": worker_state.lag_view(),
            "circuit_breakers": worker_state.breakers_view(),
        }

    # The relay drains the partitions this worker's pipeline consumer holds, so the
    # workers split the outbox the way they split the topic.
    relay_service = RelayService(
        settings, runtime.relay, pipeline.assigned_partitions, loop=app.loop
    )
    pipeline.on_assignment = relay_service.wake
    app.service(relay_service)
    app.service(pipeline)
    runtime.relay_wake = relay_service.wake

    @app.timer(interval=settings.outbox_poll_interval_ms / 1000)
    async def poll_outbox() -> None:
        """The safety net under LISTEN/NOTIFY: wake the relay every poll interval."""
        relay_service.wake()

    @app.agent(dlq_topic, name="dead-letters")
    async def keep_dead_letters(stream: faust.StreamT) -> None:
        async for events in stream.take_events(DLQ_BATCH, within=DLQ_BATCH_WITHIN_S):
            stored = await _store_until_done(runtime, [_dlq_message(event) for event in events])
            runtime.metrics.dlq_stored.inc(stored)

    register_views(app, runtime, consumer_state)
    return app


async def _store_until_done(runtime: Runtime, messages: list[DlqMessage]) -> int:
    """Stores a batch of dead letters, retrying while the database fails.

    An exception escaping the agent would crash it, and Faust may then acknowledge the
    batch it held: dead letters missing from the table. Storing is idempotent (keyed by DLQ
    position), so retrying is safe; the batch stays in the topic until it is stored.
    """
    for attempt in itertools.count(1):
        try:
            async with stall_deadline(
                runtime.engine,
                runtime.settings.database_stall_limit_s,
                f"storing {len(messages)} dead letter(s)",
                "DATABASE_TIMEOUT_MS",
            ):
                return await store_dead_letters(runtime.engine, messages)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = backoff_delay(attempt, DLQ_RETRY_BASE_S, DLQ_RETRY_MAX_S)
            log.error(
                "Storing %d dead letter(s) failed (attempt %d), retrying in %.1fs: %r",
                len(messages),
                attempt,
                delay,
                exc,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _dlq_message(event: faust.EventT) -> DlqMessage:
    message = event.message
    return DlqMessage(
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=list(message.headers or []),
    )


def _create_app_or_exit() -> HoldwallApp:
    """A bad setting stops the process with one line naming the variable."""
    try:
        return create_app(load_settings())
    except (SettingsError, HandlerConfigError) as exc:
        print(f"holdwall-stream: invalid setting: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_SETTING) from None


use_preferred_loop(os.environ)
app = _create_app_or_exit()
