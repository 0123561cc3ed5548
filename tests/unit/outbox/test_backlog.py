"""How often the backlog is counted: exact while cheap, rationed once a count is slow."""

from __future__ import annotations

import asyncio

import pytest

from holdwall_stream.outbox.backlog import CHEAP_QUERY_S, CachedBacklog, reuse_for
from holdwall_stream.outbox.store import BacklogStats


class _Counter:
    """Stands in for the database count: each call takes ``duration`` on a fake clock."""

    def __init__(self, duration: float) -> None:
        self.now = 0.0
        self.duration = duration
        self.calls = 0
        self.release: asyncio.Event | None = None

    def clock(self) -> float:
        return self.now

    async def count(self) -> BacklogStats:
        self.calls += 1
        if self.release is not None:
            await self.release.wait()
        self.now += self.duration
        return BacklogStats(backlog=self.calls, oldest_age_s=None, dead_lettered=0)


def test_a_cheap_count_is_never_reused_and_a_slow_one_for_twenty_times_its_cost() -> None:
    assert reuse_for(CHEAP_QUERY_S / 2) == 0.0
    assert reuse_for(0.8) == pytest.approx(16.0)


async def test_cheap_counts_stay_exact() -> None:
    counter = _Counter(duration=0.001)
    backlog = CachedBacklog(counter.count, counter.clock)
    assert (await backlog.get()).backlog == 1
    assert (await backlog.get()).backlog == 2


async def test_a_slow_count_is_reused_until_its_time_is_up() -> None:
    counter = _Counter(duration=1.0)
    backlog = CachedBacklog(counter.count, counter.clock)
    assert (await backlog.get()).backlog == 1
    counter.now += 19.0
    assert (await backlog.get()).backlog == 1, "reused for 20 s after a 1 s count"
    assert backlog.age_s() == pytest.approx(19.0)
    counter.now += 1.5
    assert (await backlog.get()).backlog == 2


async def test_callers_during_a_count_share_it_or_get_the_previous_figures() -> None:
    counter = _Counter(duration=1.0)
    backlog = CachedBacklog(counter.count, counter.clock)
    counter.release = asyncio.Event()
    first = asyncio.gather(*(backlog.get() for _ in range(3)))
    await asyncio.sleep(0)
    counter.release.set()
    assert [s.backlog for s in await first] == [1, 1, 1], "one count for three callers"

    counter.now += 30.0  # past its reuse time: the next caller starts a count...
    counter.release = asyncio.Event()
    recount = asyncio.ensure_future(backlog.get())
    await asyncio.sleep(0)
    assert (await backlog.get()).backlog == 1, "...and others get the last figures meanwhile"
    counter.release.set()
    assert (await recount).backlog == 2
    assert counter.calls == 2


async def test_a_caller_that_gives_up_leaves_the_count_to_finish() -> None:
    counter = _Counter(duration=1.0)
    backlog = CachedBacklog(counter.count, counter.clock)
    counter.release = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await backlog.get()
    counter.release.set()
    assert (await backlog.get()).backlog == 1
    assert counter.calls == 1


async def test_a_failed_count_reaches_its_callers_and_the_next_call_counts_again() -> None:
    calls = 0

    async def failing_once() -> BacklogStats:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database unreachable")
        return BacklogStats(backlog=7, oldest_age_s=None, dead_lettered=0)

    backlog = CachedBacklog(failing_once)
    with pytest.raises(ConnectionError):
        await backlog.get()
    assert (await backlog.get()).backlog == 7


@pytest.mark.parametrize("started", [False, True], ids=["before-it-ran", "while-counting"])
async def test_cancel_stops_a_count_and_the_next_call_counts_again(started: bool) -> None:
    counter = _Counter(duration=1.0)
    backlog = CachedBacklog(counter.count, counter.clock)
    counter.release = asyncio.Event()
    waiting = asyncio.ensure_future(backlog.get())
    await asyncio.sleep(0)  # the caller starts the count...
    if started:
        await asyncio.sleep(0)  # ...which reaches the database
    await backlog.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert counter.calls == (1 if started else 0)
    counter.release.set()
    assert (await backlog.get()).backlog == counter.calls
    assert counter.calls == (2 if started else 1)
