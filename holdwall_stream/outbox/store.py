"""The relay's SQL: claim a partition's next batch, record failures, report backlog, prune.

Claiming is one statement that marks the rows published inside a transaction the relay
keeps open until Kafka acknowledged them: a crash or a produce error rolls the mark back,
so a row is never marked without being on the topic (at-least-once, never loss).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

from psycopg.types.string import ByteaBinaryLoader
from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    LargeBinary,
    Text,
    Uuid,
    bindparam,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from holdwall_stream.db.engine import psycopg_connection
from holdwall_stream.db.models import DEAD_LETTERED, UNPUBLISHED, Outbox, RelayLock, Timestamp
from holdwall_stream.pipeline.envelope import EVENT_ID_HEADER

# The partial indexes' own predicates (db/models.py): spelled any other way, a query might
# not be answered from its index.
_UNPUBLISHED = UNPUBLISHED.text
_DEAD_LETTERED = DEAD_LETTERED.text

# PostgreSQL, run on the driver connection (psycopg, binary results): the relay's hot path,
# one round trip.
# - It takes the partition's lock row (SKIP LOCKED: if another worker holds it, the claim
#   finds nothing).
# - It takes the partition's lowest unpublished ids that are committed (visible to the
#   statement), in id order. Every claim starts at the lowest one: starting after the last
#   id an earlier claim took would let a row committed meanwhile with a lower id be
#   overtaken by a later row of its key.
#   Per key this is commit order: a writer that writes a key after the previous write of
#   that key committed gets a higher id, and a statement that sees the later row sees the
#   earlier one too. Nothing older has to end first, so a long transaction elsewhere never
#   holds the relay back.
# - The lock is taken after the statement's snapshot: a relay that held it until just
#   before may have committed rows this snapshot still sees unpublished. The UPDATE
#   re-checks "unpublished" on the row's latest version (as READ COMMITTED does for rows
#   changed concurrently), so such a row is skipped instead of published twice.
# - The transaction commits without waiting for its WAL flush: if a database crash lost
#   the commit, the rows (already on the topic) would only be published again.
PG_CLAIM = f"""
    WITH locked AS (
        SELECT partition, set_config('synchronous_commit', 'off', true) AS async_commit
        FROM relay_locks WHERE partition = %(partition)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox SET published = true, published_at = now()
    WHERE {_UNPUBLISHED} AND id IN (
        SELECT id FROM outbox
        WHERE partition = (SELECT partition FROM locked) AND {_UNPUBLISHED}
        ORDER BY id LIMIT %(limit)s
    )
    RETURNING id, event_id::text AS event_id, key, payload, headers::text AS headers, attempts,
              extract(epoch FROM created_at)::float8 AS written_at
    """
_SQLITE_CLAIM = text(
    f"""
    UPDATE outbox SET published = 1, published_at = :now
    WHERE id IN (
        SELECT id FROM outbox WHERE partition = :partition AND {_UNPUBLISHED}
        ORDER BY id LIMIT :limit
    )
    RETURNING id, event_id, key, payload, headers, attempts,
              (julianday(created_at) - 2440587.5) * 86400.0 AS written_at
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
    "written_at": Float,
}


# A claimed row as the driver returns it, in PG_CLAIM's RETURNING order:
#   (id, event_id, key, payload, headers_json, attempts, written_at)
# A batch is thousands of rows, so there is no object per row: the send loop unpacks the
# tuples. event_id and headers_json (the headers column's JSON text: the headers besides
# ``event-id``) come as UTF-8 bytes, as Kafka headers want them. written_at is the row's
# created_at (the writing transaction's start) in epoch seconds, the database's clock.
ClaimedRow = tuple[int, bytes, bytes, bytes, bytes | None, int, float]

# Columns of a batch, by the positions above.
_ids = itemgetter(0)
_written_ats = itemgetter(6)


def kafka_headers(event_id: bytes, headers_json: bytes | None) -> list[tuple[str, bytes]]:
    """A row's Kafka headers: ``event-id`` from its column first, then the stored ones."""
    return [(EVENT_ID_HEADER, event_id), *_other_headers(headers_json)]


def row_ids(rows: Sequence[ClaimedRow]) -> list[int]:
    return list(map(_ids, rows))


def oldest_written_at(rows: Sequence[ClaimedRow]) -> float:
    return min(map(_written_ats, rows))


@lru_cache(maxsize=4096)
def _other_headers(text: bytes | None) -> tuple[tuple[str, bytes], ...]:
    """A row's headers besides ``event-id``, as Kafka wants them.

    Parsed once per distinct text: the writer stores only ``event-type`` here, so there
    are about as many as event types, and parsing per row cost a third of the relay's
    CPU. An ``event-id`` in the text (rows written before it moved to its column) is left
    out, so the header is never sent twice.
    """
    if not text:
        return ()
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"outbox headers are not a JSON object: {text[:100]!r}")
    return tuple(
        (name, item.encode() if isinstance(item, str) else str(item).encode())
        for name, item in value.items()
        if name != EVENT_ID_HEADER
    )


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


async def claim_batch(connection: AsyncConnection, partition: int, limit: int) -> list[ClaimedRow]:
    """Locks the partition and marks its next rows published, in the open transaction.

    Returns the claimed rows (see :data:`ClaimedRow`) in id order; none when another
    worker holds the partition (it is relaying it right now).
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
        rows = [
            (
                row_id,
                str(event_id).encode(),
                key,
                payload,
                None if headers is None else headers.encode(),
                attempts,
                written_at,
            )
            for row_id, event_id, key, payload, headers, attempts, written_at in result
        ]
    rows.sort(key=_ids)
    return rows


async def _pg_claim(connection: AsyncConnection, partition: int, limit: int) -> list[ClaimedRow]:
    # Binary results spare the hex decoding of bytea; text columns stay the UTF-8 bytes they
    # arrive as (Kafka headers are bytes), and no SQLAlchemy result processing runs per row.
    driver = await psycopg_connection(connection)
    async with driver.cursor(binary=True) as cursor:
        cursor.adapters.register_loader("text", ByteaBinaryLoader)
        await cursor.execute(PG_CLAIM, {"partition": partition, "limit": limit})
        return await cursor.fetchall()


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


async def parked_row(connection: AsyncConnection, event_id: uuid.UUID) -> ClaimedRow | None:
    """The outbox row of ``event_id`` as the relay would send it, if the relay parked it
    (mark_dead_lettered); None if there is none or it is no longer parked."""
    row = (
        await connection.execute(
            select(Outbox.id, Outbox.key, Outbox.payload, Outbox.headers, Outbox.attempts)
            .where(Outbox.event_id == event_id, DEAD_LETTERED)
            .with_for_update()
        )
    ).first()
    if row is None:
        return None
    headers_json = json.dumps(row.headers).encode() if row.headers else None
    return (row.id, str(event_id).encode(), row.key, row.payload, headers_json, row.attempts, 0.0)


async def requeue_parked(connection: AsyncConnection, row_id: int) -> None:
    """Hands a parked row back to the relay, which claims it next in its partition: its id
    is older than the rows of its key sent since, so it reaches the topic after them."""
    await connection.execute(
        update(Outbox)
        .where(Outbox.id == row_id, DEAD_LETTERED)
        .values(dead_lettered_at=None, last_error=None)
    )


def _seconds_since(connection: AsyncConnection, timestamp_sql: str) -> str:
    """SQL for the seconds from ``timestamp_sql`` until now, on the database's clock."""
    if connection.dialect.name == "postgresql":
        return f"EXTRACT(EPOCH FROM (now() - {timestamp_sql}))"
    return f"(julianday('now') - julianday({timestamp_sql})) * 86400.0"


def _age(value: Any) -> float | None:
    return None if value is None else max(0.0, float(value))


async def backlog_stats(connection: AsyncConnection) -> BacklogStats:
    age = _seconds_since(connection, "min(created_at)")
    backlog, oldest = (
        await connection.execute(text(f"SELECT count(*), {age} FROM outbox WHERE {_UNPUBLISHED}"))
    ).one()
    return BacklogStats(
        backlog=int(backlog),
        oldest_age_s=_age(oldest),
        dead_lettered=await dead_lettered_count(connection),
    )


async def dead_lettered_count(connection: AsyncConnection) -> int:
    """Rows parked as too large (answered from their partial index)."""
    dead = await connection.scalar(text(f"SELECT count(*) FROM outbox WHERE {_DEAD_LETTERED}"))
    return int(dead or 0)


@dataclass(frozen=True)
class PartitionBacklog:
    """One outbox partition's unpublished rows, and the row at their head: the relay sends
    a partition in id order, so a head row that keeps failing says why it does not move."""

    partition: int
    unpublished: int
    oldest_age_s: float | None
    head_id: int
    head_attempts: int
    head_last_error: str | None


async def partition_backlogs(connection: AsyncConnection) -> list[PartitionBacklog]:
    """Every partition with unpublished rows, in partition order (reads the whole backlog)."""
    age = _seconds_since(connection, "min(created_at)")
    counts = (
        await connection.execute(
            text(
                f"SELECT partition, count(*), {age}, min(id) FROM outbox WHERE {_UNPUBLISHED} "
                "GROUP BY partition ORDER BY partition"
            )
        )
    ).all()
    backlogs = []
    for partition, unpublished, oldest, head_id in counts:
        attempts, last_error = (
            await connection.execute(
                text("SELECT attempts, last_error FROM outbox WHERE id = :id"), {"id": head_id}
            )
        ).one()
        backlogs.append(
            PartitionBacklog(
                partition=int(partition),
                unpublished=int(unpublished),
                oldest_age_s=_age(oldest),
                head_id=int(head_id),
                head_attempts=int(attempts),
                head_last_error=last_error,
            )
        )
    return backlogs


async def last_published_age_s(connection: AsyncConnection) -> float | None:
    """Seconds since the relay last marked a row published (None: never, or all pruned)."""
    age = _seconds_since(connection, "max(published_at)")
    return _age(await connection.scalar(text(f"SELECT {age} FROM outbox WHERE published = true")))


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
