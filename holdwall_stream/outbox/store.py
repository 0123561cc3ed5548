"""The relay's SQL: claim a partition's next batch, record failures, report backlog, prune.

Claiming is one statement that marks the rows published inside a transaction the relay
keeps open until Kafka acknowledged them: a crash or a produce error rolls the mark back,
so a row is never marked without being on the topic (at-least-once, never loss).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.scanner import make_scanner  # type: ignore[attr-defined]
from operator import attrgetter
from typing import Any

from sqlalchemy import BigInteger, Integer, LargeBinary, Text, Uuid, bindparam, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from holdwall_stream.db.engine import psycopg_connection
from holdwall_stream.db.models import RelayLock, Timestamp

_UNPUBLISHED = "published = false AND dead_lettered_at IS NULL"

RELAY_APPLICATION_NAME = "holdwall-outbox-relay"

# PostgreSQL, run on the driver connection (psycopg, binary results): the relay's hot path,
# one round trip.
# - It takes the partition's lock row (SKIP LOCKED: if another worker holds it, the claim
#   finds nothing).
# - It skips rows whose writing transaction is not older than the oldest transaction that
#   could still add outbox rows (the horizon), so a row is only relayed once every
#   transaction that could still commit a lower id has ended. The horizon is the oldest of
#   the snapshot's in-progress transactions, leaving out those known to be unable to write
#   here: another database's, and relay transactions (named RELAY_APPLICATION_NAME for
#   their duration). A transaction not found in pg_stat_activity any more counts, so a
#   race can only make the horizon lower (later), never let a row overtake. The snapshot
#   is the statement's, taken before the lock gives this transaction an id.
# - A last row of NULLs says, when the claim is short of a full batch, whether committed
#   rows were held back by the horizon (1 in its last column): nothing will NOTIFY when
#   the transaction holding them ends, so the relay has to look again by itself.
# - The lock is taken after the statement's snapshot: a relay that held it until just
#   before may have committed rows this snapshot still sees unpublished. The UPDATE
#   re-checks "unpublished" on the row's latest version (as READ COMMITTED does for rows
#   changed concurrently), so such a row is skipped instead of published twice.
# - Every claim scans the partition from its lowest unpublished id, also the second and
#   later claims of one relay transaction (which walk past the index entries of the rows
#   they marked earlier): starting after the last id claimed would let a row still being
#   written with a lower id be overtaken by a later row of its key.
# - The transaction commits without waiting for its WAL flush: if a database crash lost
#   the commit, the rows (already on the topic) would only be published again.
PG_CLAIM = f"""
    WITH snapshot AS (
        SELECT pg_current_snapshot() AS s
    ), unable_to_write_here AS (
        SELECT backend_xid::text::bigint AS xid32 FROM pg_stat_activity
        WHERE backend_xid IS NOT NULL
          AND (datname IS DISTINCT FROM current_database()
               OR application_name = '{RELAY_APPLICATION_NAME}')
    ), horizon AS (
        SELECT coalesce(
                   (SELECT min(x::text::bigint) FROM snapshot, pg_snapshot_xip(s) AS x
                    WHERE x::text::bigint %% 4294967296
                          NOT IN (SELECT xid32 FROM unable_to_write_here)),
                   (SELECT pg_snapshot_xmax(s)::text::bigint FROM snapshot)
               ) AS xmin,
               set_config('application_name', '{RELAY_APPLICATION_NAME}', true) AS name,
               set_config('synchronous_commit', 'off', true) AS async_commit
    ), locked AS (
        SELECT partition FROM relay_locks WHERE partition = %(partition)s
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE outbox SET published = true, published_at = now()
        WHERE {_UNPUBLISHED} AND id IN (
            SELECT id FROM outbox
            WHERE partition = (SELECT partition FROM locked)
              AND {_UNPUBLISHED}
              AND (txid IS NULL OR txid < (SELECT xmin FROM horizon))
            ORDER BY id LIMIT %(limit)s
        )
        RETURNING id, event_id::text AS event_id, key, payload, headers::text AS headers,
                  attempts
    )
    SELECT id, event_id, key, payload, headers, attempts FROM claimed
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL,
        CASE WHEN (SELECT count(*) FROM claimed) < %(limit)s THEN (EXISTS (
            -- Every eligible row was claimed, so among the first claimed + 1 rows in the
            -- partition's index range one is held back, if any is: a bounded index scan.
            SELECT 1 FROM (
                SELECT txid FROM outbox
                WHERE partition = (SELECT partition FROM locked) AND {_UNPUBLISHED}
                ORDER BY id LIMIT %(limit)s + 1
            ) AS waiting
            WHERE waiting.txid >= (SELECT xmin FROM horizon)
        ))::int ELSE 0 END
    """
_SQLITE_CLAIM = text(
    f"""
    UPDATE outbox SET published = 1, published_at = :now
    WHERE id IN (
        SELECT id FROM outbox WHERE partition = :partition AND {_UNPUBLISHED}
        ORDER BY id LIMIT :limit
    )
    RETURNING id, event_id, key, payload, headers, attempts
    """
)
_TIMESTAMP = Timestamp
_SQLITE_ROW_TYPES = {
    "id": BigInteger,
    "event_id": Uuid,
    "key": LargeBinary,
    "payload": LargeBinary,
    "headers": Text,
    "attempts": Integer,
}


class ClaimedRow:
    """One claimed outbox row, as cheap to build as possible (thousands per batch).

    ``headers_json`` is the column's JSON text; it is parsed only when the row is sent.
    ``rough_size`` bounds :attr:`size` from above (JSON text is never shorter than the
    names and values it holds), so the exact size is only worked out near the limit.
    """

    __slots__ = ("attempts", "event_id", "headers_json", "id", "key", "payload", "rough_size")

    def __init__(
        self,
        id: int,
        event_id: str,
        key: bytes,
        payload: bytes,
        headers_json: str | None,
        attempts: int,
    ) -> None:
        self.id = id
        self.event_id = event_id
        self.key = key
        self.payload = payload
        self.headers_json = headers_json
        self.attempts = attempts
        self.rough_size = len(key) + len(payload) + (len(headers_json) if headers_json else 0)

    @property
    def headers(self) -> dict[str, str]:
        return _parse_json_object(self.headers_json) if self.headers_json else {}

    def fits(self, limit: int) -> bool:
        """Whether the message is within ``limit`` bytes (see :attr:`size`)."""
        return self.rough_size <= limit or self.size <= limit

    @property
    def size(self) -> int:
        """Bytes on the wire, roughly: what the broker's message size limit compares."""
        return (
            len(self.key)
            + len(self.payload)
            + sum(len(k.encode()) + len(str(v).encode()) for k, v in self.headers.items())
        )

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        text = self.headers_json
        if not text:
            return []
        try:  # the common case, string values, with the C scanner and no checks
            return [(name, value.encode()) for name, value in _scan_json(text, 0)[0].items()]
        except (AttributeError, StopIteration, ValueError):
            return [
                (name, value.encode() if isinstance(value, str) else str(value).encode())
                for name, value in _parse_json_object(text).items()
            ]

    def __repr__(self) -> str:
        return f"ClaimedRow(id={self.id}, event_id={self.event_id}, attempts={self.attempts})"


def all_fit(rows: Sequence[ClaimedRow], limit: int) -> bool:
    """Whether every row is within ``limit`` bytes (the cheap bound, exact only if needed)."""
    return not rows or max(map(_rough_size, rows)) <= limit or all(r.fits(limit) for r in rows)


_rough_size = attrgetter("rough_size")


# json.loads costs three Python frames around the C scanner; per row that is a third of the
# relay's header handling. The scanner itself is what json.loads ends up calling.
_scan_json = make_scanner(json.JSONDecoder())


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        value, _end = _scan_json(text, 0)
    except (StopIteration, ValueError):
        value = json.loads(text)  # raises the usual, descriptive error
    if not isinstance(value, dict):
        raise ValueError(f"outbox headers are not a JSON object: {text[:100]!r}")
    return value


class Claim(list[ClaimedRow]):
    """Claimed rows, in id order, and whether committed rows were held back (horizon)."""

    held_back: bool = False


@dataclass(frozen=True)
class BacklogStats:
    backlog: int
    oldest_age_s: float | None
    dead_lettered: int


async def ensure_relay_locks(connection: AsyncConnection, partitions: int) -> None:
    """One lock row per partition; rows for a larger KAFKA_PARTITIONS are added."""
    if connection.dialect.name != "postgresql":
        return
    await connection.execute(
        pg_insert(RelayLock).on_conflict_do_nothing(),
        [{"partition": p} for p in range(partitions)],
    )


async def claim_batch(connection: AsyncConnection, partition: int, limit: int) -> Claim:
    """Locks the partition and marks its next rows published, in the open transaction.

    Returns the claimed rows in id order; none when another worker holds the partition
    (it is relaying it right now). ``held_back`` (PostgreSQL): committed rows wait for
    older transactions to end.
    """
    if connection.dialect.name == "postgresql":
        rows = await _pg_claim(connection, partition, limit)
    else:
        statement = _SQLITE_CLAIM.columns(**_SQLITE_ROW_TYPES).bindparams(
            bindparam("now", type_=_TIMESTAMP)
        )
        result = await connection.execute(
            statement,
            {"partition": partition, "limit": limit, "now": datetime.now(UTC)},
        )
        rows = Claim(
            ClaimedRow(row_id, str(event_id), key, payload, headers, attempts)
            for row_id, event_id, key, payload, headers, attempts in result
        )
    rows.sort(key=_row_id)
    return rows


async def _pg_claim(connection: AsyncConnection, partition: int, limit: int) -> Claim:
    # Binary results spare the hex decoding of bytea, and no SQLAlchemy result processing
    # runs per row.
    driver = await psycopg_connection(connection)
    async with driver.cursor(binary=True) as cursor:
        await cursor.execute(PG_CLAIM, {"partition": partition, "limit": limit})
        rows = await cursor.fetchall()
    claim = Claim(ClaimedRow(*row) for row in rows if row[1] is not None)
    claim.held_back = any(row[5] for row in rows if row[1] is None)
    return claim


def _row_id(row: ClaimedRow) -> int:
    return row.id


async def record_failure(connection: AsyncConnection, ids: Sequence[int], error: str) -> None:
    await connection.execute(
        text(
            "UPDATE outbox SET attempts = attempts + 1, last_error = :error WHERE id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": list(ids), "error": error[:2000]},
    )


async def mark_dead_lettered(connection: AsyncConnection, row_id: int, reason: str) -> None:
    """Parks a claimed row: not published (the claim's mark is undone), so retention, which
    deletes published rows only, keeps it and its payload for the operator."""
    await connection.execute(
        text(
            "UPDATE outbox SET dead_lettered_at = :now, last_error = :reason, "
            "published = false, published_at = NULL, attempts = attempts + 1 WHERE id = :id"
        ).bindparams(bindparam("now", type_=_TIMESTAMP)),
        {"now": datetime.now(UTC), "reason": reason[:2000], "id": row_id},
    )


async def backlog_stats(connection: AsyncConnection) -> BacklogStats:
    if connection.dialect.name == "postgresql":
        age = "EXTRACT(EPOCH FROM (now() - min(created_at)))"
    else:
        age = "(julianday('now') - julianday(min(created_at))) * 86400.0"
    backlog, oldest = (
        await connection.execute(text(f"SELECT count(*), {age} FROM outbox WHERE {_UNPUBLISHED}"))
    ).one()
    dead = await connection.scalar(
        text("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL")
    )
    return BacklogStats(
        backlog=int(backlog),
        oldest_age_s=None if oldest is None else max(0.0, float(oldest)),
        dead_lettered=int(dead or 0),
    )


async def delete_published_before(connection: AsyncConnection, cutoff: datetime, limit: int) -> int:
    """Deletes one bounded batch of old published rows; short, so locks stay short."""
    skip_locked = " FOR UPDATE SKIP LOCKED" if connection.dialect.name == "postgresql" else ""
    result = await connection.execute(
        text(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox "
            "WHERE published = true AND published_at < :cutoff "
            f"ORDER BY published_at LIMIT :limit{skip_locked})"
        ).bindparams(bindparam("cutoff", type_=_TIMESTAMP)),
        {"cutoff": cutoff, "limit": limit},
    )
    return int(result.rowcount or 0)
