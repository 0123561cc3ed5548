"""A deadline for a unit of database work, against a server that stops answering.

Connections to a PostgreSQL that went silent behind a proxy (or hung) stay open to the
kernel, so neither libpq's TCP options nor the driver ever give up on them: the work would
wait forever. Past the deadline it is cancelled (psycopg asks the server to cancel and
closes the connection when that goes unanswered for 5 s), and the pool starts afresh,
since each idle connection would stall the next checkout's ping the same way.

Only for work whose connection may be lost with it: SQLAlchemy invalidates a connection
whose statement is interrupted by a cancellation (CancelledError counts as a disconnect),
even when the server confirmed the cancel. A handler attempt inside the pipeline's batch
transaction has its own deadline for that reason (pipeline/handler_deadline.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sqlalchemy.ext.asyncio import AsyncEngine

from holdwall_stream.errors import DatabaseStalledError


@asynccontextmanager
async def stall_deadline(
    engine: AsyncEngine, seconds: float | None, work: str, limit: str
) -> AsyncIterator[asyncio.Timeout]:
    """Raises DatabaseStalledError naming ``work`` and ``limit`` (the settings behind
    ``seconds``) if the block runs longer; None means no deadline. Yields the timeout, for
    stretches of the block that must not count (see :func:`not_counted`)."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield deadline
    except TimeoutError:
        if not deadline.expired():
            raise
        await engine.dispose()
        raise DatabaseStalledError(
            f"{work} did not finish within {seconds:g} s ({limit}); the database did not "
            "answer in time. Its connections were dropped; the work is retried on new ones"
        ) from None


@contextmanager
def not_counted(deadline: asyncio.Timeout) -> Iterator[None]:
    """Stops the clock of ``deadline`` inside: for work that is not the database's and has
    a bound of its own (a handler attempt)."""
    when = deadline.when()
    if when is None or deadline.expired():
        yield
        return
    loop = asyncio.get_running_loop()
    remaining = when - loop.time()
    deadline.reschedule(None)
    try:
        yield
    finally:
        deadline.reschedule(loop.time() + remaining)
