"""The relay's drive loop inside the worker: wake on NOTIFY or the poll timer, then drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from mode import Service

from holdwall_stream.db.engine import silent_server_timeouts
from holdwall_stream.db.errors import describe, is_database_unavailable
from holdwall_stream.observability.outage_log import OutageLog
from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.wakeup import listen_for_outbox_writes
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)
BACKLOG_REFRESH_S = 2.0
RETENTION_INTERVAL_S = 60.0


class RelayService(Service):
    """Drains the partitions this worker owns whenever woken.

    ``owned_partitions`` follows the pipeline consumer's assignment of the events topic, so
    workers split the outbox the way they split the topic; the relay's per-partition lock
    makes a moment of double ownership during a rebalance harmless.

    Each partition drains in a task of its own: a partition with a backlog, or one whose
    batch waits on a slow or unreachable broker, never holds up the others' new rows.
    """

    def __init__(
        self,
        settings: Settings,
        relay: OutboxRelay,
        owned_partitions: Callable[[], Collection[int]],
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._settings = settings
        self._relay = relay
        self._owned_partitions = owned_partitions
        self._wakeup = asyncio.Event()
        self._draining: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()
        self._wake_all = False
        self._wanted: set[int] = set()
        self._database_outage = OutageLog(log, "Outbox relay: database")
        self._backlog_outage = OutageLog(log, "Outbox backlog count")

    def wake(self, partitions: Collection[int] | None = None) -> None:
        """Drains ``partitions`` (all owned ones if None) as soon as possible."""
        if partitions is None:
            self._wake_all = True
        else:
            self._wanted.update(partitions)
        self._wakeup.set()

    async def on_start(self) -> None:
        await self._relay.prepare()
        if self._settings.database_dialect == "postgresql":
            self.add_future(
                listen_for_outbox_writes(
                    self._settings.async_database_url,
                    self.wake,
                    connect_options=silent_server_timeouts(self._settings),
                )
            )

    async def on_stop(self) -> None:
        """Lets batches in flight finish (their rows are re-sent if cut short), then stops."""
        tasks = list(self._draining.values())
        if tasks:
            _done, pending = await asyncio.wait(
                tasks, timeout=self._settings.kafka_request_timeout / 1000
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._relay.stop_counting()

    @Service.task
    async def _drain_loop(self) -> None:
        while not self.should_stop:
            await self._wakeup.wait()
            self._wakeup.clear()
            owned = set(self._owned_partitions())
            woken = owned if self._wake_all else owned & self._wanted
            self._wake_all = False
            self._wanted.clear()
            for partition in sorted(woken):
                if partition in self._draining:
                    self._again.add(partition)  # its task takes another round
                else:
                    self._draining[partition] = asyncio.create_task(
                        self._drain_partition(partition), name=f"relay-partition-{partition}"
                    )

    async def _drain_partition(self, partition: int) -> None:
        try:
            async with self._relay.holding_connection(partition):
                while not self.should_stop:
                    self._again.discard(partition)
                    try:
                        more = await self._relay.drain([partition])
                    except Exception as exc:
                        if is_database_unavailable(exc):
                            self._database_outage.failed(describe(exc))
                        else:
                            log.exception("Outbox relay pass failed; the next poll retries")
                        more = False
                    else:
                        self._database_outage.succeeded()
                    if not (more or partition in self._again):
                        return
                    if partition not in self._owned_partitions():
                        return
        finally:
            self._draining.pop(partition, None)
            self._again.discard(partition)

    @Service.timer(BACKLOG_REFRESH_S)
    async def _refresh_backlog(self) -> None:
        try:
            await self._relay.backlog()
        except Exception as exc:
            if is_database_unavailable(exc):
                self._backlog_outage.failed(describe(exc))
            else:
                log.warning("Could not read the outbox backlog: %r", exc)
        else:
            self._backlog_outage.succeeded()

    @Service.timer(RETENTION_INTERVAL_S)
    async def _prune(self) -> None:
        try:
            deleted = await self._relay.prune()
            if deleted:
                log.info("Outbox retention deleted %d published rows", deleted)
        except Exception as exc:
            log.warning("Outbox retention pass failed: %r", exc)
