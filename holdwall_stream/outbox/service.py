"""The relay's drive loop inside the worker: wake on NOTIFY or the poll timer, then drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from mode import Service

from holdwall_stream.outbox.relay import OutboxRelay
from holdwall_stream.outbox.wakeup import listen_for_outbox_writes
from holdwall_stream.settings import Settings

log = logging.getLogger(__name__)
BACKLOG_REFRESH_S = 2.0
RETENTION_INTERVAL_S = 60.0


class RelayService(Service):
    """Drains the partitions this worker owns whenever woken.

    ``owned_partitions`` follows Faust's assignment of the events topic, so workers split
    the outbox the way they split the topic; the relay's per-partition lock makes a
    moment of double ownership during a rebalance harmless.
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

    def wake(self) -> None:
        self._wakeup.set()

    async def on_start(self) -> None:
        await self._relay.prepare()
        if self._settings.database_dialect == "postgresql":
            self.add_future(listen_for_outbox_writes(self._settings.async_database_url, self.wake))

    @Service.task
    async def _drain_loop(self) -> None:
        while not self.should_stop:
            await self._wakeup.wait()
            self._wakeup.clear()
            partitions = sorted(self._owned_partitions())
            if not partitions:
                continue
            try:
                if await self._relay.drain(partitions):
                    self.wake()
            except Exception:
                log.exception("Outbox relay pass failed; the next poll retries")

    @Service.timer(BACKLOG_REFRESH_S)
    async def _refresh_backlog(self) -> None:
        try:
            await self._relay.backlog()
        except Exception as exc:
            log.warning("Could not read the outbox backlog: %r", exc)

    @Service.timer(RETENTION_INTERVAL_S)
    async def _prune(self) -> None:
        try:
            deleted = await self._relay.prune()
            if deleted:
                log.info("Outbox retention deleted %d published rows", deleted)
        except Exception as exc:
            log.warning("Outbox retention pass failed: %r", exc)
