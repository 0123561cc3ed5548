"""PostgreSQL LISTEN/NOTIFY: the event writer's NOTIFY wakes the relay at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping

import psycopg
from sqlalchemy.engine import make_url

from holdwall_stream.db.errors import describe
from holdwall_stream.observability.outage_log import OutageLog
from holdwall_stream.outbox.writer import OUTBOX_CHANNEL

log = logging.getLogger(__name__)
RECONNECT_DELAY_S = 2.0
# Every this many seconds the LISTEN connection must answer a query within the timeout.
QUIET_CHECK_S = 30.0
LIVENESS_TIMEOUT_S = 5.0


def libpq_url(async_url: str) -> str:
    return make_url(async_url).set(drivername="postgresql").render_as_string(hide_password=False)


def partitions_of(payload: str) -> set[int] | None:
    """The partitions a notification names ("0,2"); None (all) if it names none or is
    not understood, so a foreign or older writer's plain NOTIFY still wakes everything."""
    try:
        partitions = {int(part) for part in payload.split(",") if part.strip()}
    except ValueError:
        return None
    return partitions or None


async def listen_for_outbox_writes(
    async_url: str,
    wake: Callable[[Collection[int] | None], None],
    *,
    connect_options: Mapping[str, int] | None = None,
    quiet_check_s: float = QUIET_CHECK_S,
    liveness_timeout_s: float = LIVENESS_TIMEOUT_S,
    reconnect_delay_s: float = RECONNECT_DELAY_S,
) -> None:
    """Calls ``wake`` on every notification with the partitions it names (None: all);
    reconnects forever (polling covers the gaps).

    A connection that died without a word (a network partition, a failover behind a
    proxy) would stay quiet until TCP gave up on it, hours later, and every write would
    wait for the poll meanwhile: every ``quiet_check_s`` the connection is asked to answer,
    and replaced if it does not within ``liveness_timeout_s``. ``connect_options`` are
    libpq's (db.engine.silent_server_timeouts), so a reconnect cannot hang either.
    """
    outage = OutageLog(log, "Outbox LISTEN connection")
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                libpq_url(async_url), autocommit=True, **(connect_options or {})
            ) as connection:
                await connection.execute(f"LISTEN {OUTBOX_CHANNEL}")
                outage.succeeded()
                wake(None)  # anything written while we were not listening
                while True:
                    async for notification in connection.notifies(timeout=quiet_check_s):
                        wake(partitions_of(notification.payload))
                    async with asyncio.timeout(liveness_timeout_s):
                        await connection.execute("SELECT 1")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outage.failed(f"{describe(exc)}; the poll wakes the relay meanwhile")
        await asyncio.sleep(reconnect_delay_s)
