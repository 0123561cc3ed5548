"""SQLAlchemy 2.0 models: the source of the schema; tables/*.sql is generated from them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    Uuid,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

# SQLite only auto-increments an INTEGER PRIMARY KEY, so BIGINT ids are INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcTimestamp(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE that always reads back timezone-aware, in UTC.

    SQLite keeps no offset: without this, its values read back naive, and comparing them
    with PostgreSQL's aware ones (or with datetime.now(UTC)) raises or misleads.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = UtcTimestamp()


class utc_now(FunctionElement[datetime]):
    """The current time as a column default: now() on PostgreSQL (microseconds).

    SQLite's CURRENT_TIMESTAMP has whole seconds, which made the outbox's oldest age and
    the relay delay metric up to a second off there; its strftime('%f') has milliseconds.
    """

    type = Timestamp
    inherit_cache = True


@compiles(utc_now)
def _utc_now(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


UNPUBLISHED = text("published = false AND dead_lettered_at IS NULL")
DEAD_LETTERED = text("dead_lettered_at IS NOT NULL")

# PostgreSQL writes a new version of every outbox row when the relay marks it published.
# Pages filled to half leave room for that version beside the old one; on full pages
# every claimed row moves to another page, and concurrent claims queue on extending the
# table: rows as the writer left them drained at 49k instead of 120-125k rows/s with three
# partitions (docs/PERFORMANCE.md). The price: published rows, kept for OUTBOX_RETENTION,
# take about twice the disk.
OUTBOX_FILLFACTOR = 50


class Base(DeclarativeBase):
    pass


class Event(Base):
    """A business event as the application wrote it."""

    __tablename__ = "events"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    type: Mapped[str] = mapped_column(String(200))
    aggregate_id: Mapped[str] = mapped_column(String(500))
    occurred_at: Mapped[datetime] = mapped_column(Timestamp)
    schema_version: Mapped[int] = mapped_column(Integer, default=1)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=utc_now())


class Outbox(Base):
    """One row per event still to be relayed (or relayed, until retention deletes it).

    ``partition`` is fixed at write time with Kafka's default partitioner so the relay can
    lock and drain one partition at a time: that is what keeps order per key.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    topic: Mapped[str] = mapped_column(String(249))
    partition: Mapped[int] = mapped_column(Integer)
    key: Mapped[bytes] = mapped_column(LargeBinary)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=utc_now())
    published: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    published_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    dead_lettered_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    __table_args__ = (
        Index(
            "ix_outbox_unpublished",
            "partition",
            "id",
            postgresql_where=UNPUBLISHED,
            sqlite_where=UNPUBLISHED,
        ),
        Index(
            "ix_outbox_published_at",
            "published_at",
            postgresql_where=text("published = true"),
            sqlite_where=text("published = 1"),
        ),
        # The backlog refresh counts dead-lettered rows every few seconds per worker;
        # without it that count reads the whole table (7 days of published rows).
        Index(
            "ix_outbox_dead_lettered",
            "id",
            postgresql_where=DEAD_LETTERED,
            sqlite_where=DEAD_LETTERED,
        ),
        {"postgresql_with": {"fillfactor": OUTBOX_FILLFACTOR}},
    )


class RelayLock(Base):
    """One row per events-topic partition; the relay holds its row lock while draining it."""

    __tablename__ = "relay_locks"

    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class ProcessedEvent(Base):
    """What the default handler records: one row per event id however often it arrives."""

    __tablename__ = "processed_events"

    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    type: Mapped[str] = mapped_column(String(200))
    processed_at: Mapped[datetime] = mapped_column(Timestamp, server_default=utc_now())


class DeadLetter(Base):
    """A message the pipeline or the relay could not deliver, kept for inspection and replay."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    reason: Mapped[str] = mapped_column(String(100))
    error: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    original_topic: Mapped[str | None] = mapped_column(String(249), nullable=True)
    original_partition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    original_offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dlq_partition: Mapped[int] = mapped_column(Integer)
    dlq_offset: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=utc_now())
    replayed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    __table_args__ = (
        Index("ux_dead_letters_dlq_position", "dlq_partition", "dlq_offset", unique=True),
    )
