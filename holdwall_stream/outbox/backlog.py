"""The backlog figures (count, oldest age, dead letters), read at a cost the database can bear.

Counting the backlog reads every unpublished row. That is nothing in steady state and
millions of rows during a broker outage or with KAFKA_ENABLED=false, exactly when the
database must keep taking the application's writes; and every worker asks, from its
2-second refresh, /api/health and /api/metrics. So a count that took long is reused for
SLOW_QUERY_REUSE_FACTOR times as long as it took (a worker spends at most ~5 % of one
database connection on it), and callers that come while a count runs get the previous
figures instead of starting another count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from holdwall_stream.outbox.store import BacklogStats

# A count faster than this is never reused: the figures stay exact while they are cheap.
CHEAP_QUERY_S = 0.05
SLOW_QUERY_REUSE_FACTOR = 20.0


def reuse_for(query_s: float) -> float:
    """Seconds a count that took ``query_s`` stays the answer."""
    return 0.0 if query_s < CHEAP_QUERY_S else query_s * SLOW_QUERY_REUSE_FACTOR


class CachedBacklog:
    """One count at a time; its result is reused as :func:`reuse_for` says."""

    def __init__(
        self,
        count: Callable[[], Awaitable[BacklogStats]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count
        self._clock = clock
        self._last: BacklogStats | None = None
        self._last_at = 0.0
        self._fresh_until = 0.0
        self._running: asyncio.Future[BacklogStats] | None = None

    def age_s(self) -> float | None:
        """Seconds since the figures :meth:`get` returns last were counted; None before."""
        return None if self._last is None else self._clock() - self._last_at

    async def get(self) -> BacklogStats:
        running = self._running
        counting = running is not None and not running.done()
        last = self._last
        if last is not None and (counting or self._clock() < self._fresh_until):
            return last
        if not counting:
            running = self._running = asyncio.ensure_future(self._recount())
            running.add_done_callback(_mark_retrieved)
        # A caller that gives up (a health check's timeout) leaves the count running for
        # the next one.
        return await asyncio.shield(running)

    async def cancel(self) -> None:
        """Stops a count in progress (at shutdown: no task left behind on a closed loop)."""
        running = self._running
        if running is not None:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    async def _recount(self) -> BacklogStats:
        started = self._clock()
        stats = await self._count()
        finished = self._clock()
        self._last, self._last_at = stats, finished
        self._fresh_until = finished + reuse_for(finished - started)
        return stats


def _mark_retrieved(count: asyncio.Future[BacklogStats]) -> None:
    """A failed count whose callers all gave up is not an unhandled error: the next
    caller counts again and sees the failure itself."""
    if not count.cancelled():
        count.exception()
