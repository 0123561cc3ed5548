"""A deadline for one handler attempt that never cuts a statement off mid-flight.

A handler waiting on something that never comes (a reply without a timeout, a stuck lock)
would hold its partition forever. asyncio's own timeout cancels the task wherever it
waits; inside a database statement that makes SQLAlchemy invalidate the connection
(CancelledError counts as a disconnect), which takes the whole batch transaction with it:
the batch would be redelivered and time out again, forever. So past the deadline a
statement in flight is cancelled in the server instead (the handler gets the database's
own error, its savepoint rolls back, the batch goes on), and only a handler waiting
elsewhere is cancelled. A statement the server does not give up within
SERVER_CANCEL_GRACE_S (a database that stopped answering) is cut off after all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType

# How often to look again whether the attempt left its statement, once past the deadline.
RECHECK_S = 0.05
# How long a statement may outlive the deadline before the task is cancelled regardless.
SERVER_CANCEL_GRACE_S = 5.0


class HandlerDeadline:
    """``async with HandlerDeadline(...)`` around one attempt; ``expired`` tells afterwards
    whether it was given up (the handler saw a cancellation or the server's cancel)."""

    def __init__(
        self,
        timeout_s: float,
        statement_running: Callable[[], bool],
        cancel_statement: Callable[[], Awaitable[None]] | None,
        grace_s: float = SERVER_CANCEL_GRACE_S,
    ) -> None:
        self._timeout_s = timeout_s
        self._grace_s = grace_s
        self._statement_running = statement_running
        self._cancel_statement = cancel_statement
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cancelling: asyncio.Task[None] | None = None
        self._cut_off_at = 0.0
        self._task_cancelled = False
        self.expired = False

    async def __aenter__(self) -> HandlerDeadline:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout_s, self._on_deadline)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        if self._cancelling is not None:
            # Delivered before the batch's next statement, which a late cancel request
            # would otherwise hit instead (PostgreSQL ignores one that finds it idle).
            await asyncio.wait([self._cancelling])
        if not self._task_cancelled or self._task is None:
            return False
        # Ours, unless somebody else cancelled the task as well (shutdown): then theirs goes
        # on as the CancelledError it is.
        if self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
            raise TimeoutError("handler attempt cancelled at its deadline") from exc
        return False

    def _on_deadline(self) -> None:
        self.expired = True
        loop = asyncio.get_running_loop()
        self._cut_off_at = loop.time() + self._grace_s
        self._check()

    def _check(self) -> None:
        """Cancels the task where it waits, unless that is inside a statement: then asks
        the server to cancel it and looks again shortly."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            return
        if self._statement_running() and loop.time() < self._cut_off_at:
            if self._cancel_statement is not None and (
                self._cancelling is None or self._cancelling.done()
            ):
                self._cancelling = asyncio.ensure_future(self._quietly(self._cancel_statement))
            self._timer = loop.call_later(RECHECK_S, self._check)
            return
        self._task_cancelled = True
        self._task.cancel()

    @staticmethod
    async def _quietly(cancel: Callable[[], Awaitable[None]]) -> None:
        """A failed cancel request leaves the statement running: the next check, or the
        grace period's end, deals with it."""
        with contextlib.suppress(Exception):
            await cancel()
