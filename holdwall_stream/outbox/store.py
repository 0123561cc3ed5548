"""The relay's SQL: claim a partition's next batch, record failures, report backlog, prune.

Claiming is one statement that marks the rows published inside a transaction the relay
keeps open until Kafka acknowledged them: a crash or a produce error rolls the mark back,
so a row is never marked without being on the topic (at-least-once, never loss).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, LargeBinary, Uuid, bindparam, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from holdwall_stream.db.models import RelayLock, Timestamp

_UNPUBLISHED = "published = false AND dead_lettered_at IS NULL"

# PostgreSQL: skip rows whose writing transaction is newer than the oldest one still
# running, so a lower id committed later can never be overtaken by a higher one.
_PG_CLAIM = text(
    f"""
    UPDATE outbox SET published = true, published_at = :now
    WHERE id IN (
        SELECT id FROM outbox
        WHERE partition = :partition AND {_UNPUBLISHED}
          AND (txid IS NULL OR txid < :horizon)
        ORDER BY id LIMIT :limit
    )
    RETURNING id, event_id, key, payload, headers, attempts
    """
)
_PG_HORIZON = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
_PG_LOCK = text(
    "SELECT partition FROM relay_locks WHERE partition = :partition FOR UPDATE SKIP LOCKED"
)
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
_ROW_TYPES = {
    "id": BigInteger,
    "event_id": Uuid,
    "key": LargeBinary,
    "payload": LargeBinary,
    "headers": JSON,
    "attempts": Integer,
}


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    id: int
    event_id: uuid.UUID
    key: bytes
    payload: bytes
    headers: dict[str, str]
    attempts: int

    @property
    def size(self) -> int:
        """Bytes on the wire, roughly: what the broker's message size limit compares."""
        return (
            len(self.key)
            + len(self.payload)
            + sum(len(k) + len(v) for k, v in self.headers.items())
        )

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        return [(name, value.encode()) for name, value in self.headers.items()]


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


async def claim_batch(
    connection: AsyncConnection, partition: int, limit: int
) -> list[ClaimedRow] | None:
    """Locks the partition and marks its next rows published, in the open transaction.

    Returns None when another worker holds the partition (it is relaying it right now).
    """
    now = datetime.now(UTC)
    if connection.dialect.name == "postgresql":
        horizon = await connection.scalar(_PG_HORIZON)
        if (await connection.execute(_PG_LOCK, {"partition": partition})).first() is None:
            return None
        statement = _PG_CLAIM.columns(**_ROW_TYPES)
        params: dict[str, Any] = {"partition": partition, "limit": limit, "horizon": horizon}
    else:
        statement = _SQLITE_CLAIM.columns(**_ROW_TYPES)
        params = {"partition": partition, "limit": limit}
    statement = statement.bindparams(bindparam("now", type_=_TIMESTAMP))
    result = await connection.execute(statement, {**params, "now": now})
    rows = [ClaimedRow(*row) for row in result]
    rows.sort(key=lambda row: row.id)
    return rows


async def record_failure(connection: AsyncConnection, ids: Sequence[int], error: str) -> None:
    await connection.execute(
        text(
            "UPDATE outbox SET attempts = attempts + 1, last_error = :error WHERE id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": list(ids), "error": error[:2000]},
    )


async def mark_dead_lettered(connection: AsyncConnection, row_id: int, reason: str) -> None:
    await connection.execute(
        text(
            "UPDATE outbox SET dead_lettered_at = :now, last_error = :reason, "
            "attempts = attempts + 1 WHERE id = :id"
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
