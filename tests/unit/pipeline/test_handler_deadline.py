"""HandlerDeadline: cancel a waiting handler, but a running statement only in the server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from holdwall_stream.pipeline.handler_deadline import HandlerDeadline


class _Statement:
    """Stands in for the driver: whether a statement runs, and cancel requests received."""

    def __init__(self) -> None:
        self.running = False
        self.cancel_requests = 0
        self.cancelled = asyncio.Event()

    def is_running(self) -> bool:
        return self.running

    async def cancel(self) -> None:
        self.cancel_requests += 1
        self.cancelled.set()

    async def run(self, *, honours_cancel: bool) -> None:
        """Runs until cancelled in the server (raising, as the driver would), or forever."""
        self.running = True
        try:
            if honours_cancel:
                await self.cancelled.wait()
                raise RuntimeError("canceling statement due to user request")
            await asyncio.Event().wait()
        finally:
            self.running = False


async def test_a_handler_waiting_elsewhere_is_cancelled_at_the_deadline() -> None:
    statement = _Statement()
    deadline = HandlerDeadline(0.05, statement.is_running, statement.cancel)
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.Event().wait()
    assert deadline.expired
    assert statement.cancel_requests == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_running_statement_is_cancelled_in_the_server_not_cut_off() -> None:
    statement = _Statement()
    deadline = HandlerDeadline(0.05, statement.is_running, statement.cancel)
    with pytest.raises(RuntimeError, match="canceling statement"):
        async with deadline:
            await statement.run(honours_cancel=True)
    assert deadline.expired
    assert statement.cancel_requests == 1
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_handler_that_swallows_the_servers_cancel_is_cut_off_once_it_waits() -> None:
    statement = _Statement()
    deadline = HandlerDeadline(0.05, statement.is_running, statement.cancel)
    with pytest.raises(TimeoutError):
        async with deadline:
            with contextlib.suppress(RuntimeError):
                await statement.run(honours_cancel=True)
            await asyncio.Event().wait()
    assert statement.cancel_requests == 1


async def test_a_statement_the_server_does_not_give_up_is_cut_off_after_the_grace() -> None:
    statement = _Statement()
    deadline = HandlerDeadline(0.05, statement.is_running, statement.cancel, grace_s=0.2)
    with pytest.raises(TimeoutError):
        async with deadline:
            await statement.run(honours_cancel=False)
    assert statement.cancel_requests >= 1


async def test_a_quick_attempt_is_left_alone() -> None:
    statement = _Statement()
    deadline = HandlerDeadline(5.0, statement.is_running, statement.cancel)
    async with deadline:
        await asyncio.sleep(0.01)
    assert not deadline.expired
    assert statement.cancel_requests == 0


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    """A worker shutting down cancels the batch: that must not become a handler timeout."""
    statement = _Statement()

    async def attempt() -> None:
        async with HandlerDeadline(0.05, statement.is_running, statement.cancel):
            await asyncio.Event().wait()

    task = asyncio.create_task(attempt())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
