"""Handlers the pipeline tests register through PIPELINE_HANDLERS (worker processes) or a
HandlerRegistry (in-process), with effects a test can count.

Workers import this module by name (``tests.support.flaky_handlers:...``): their
PYTHONPATH starts with the repository root. The files and table they use come from the
environment, so each test points them at its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import text

from holdwall_stream.pipeline.envelope import EventEnvelope
from holdwall_stream.pipeline.handlers import transaction

MARKER_ENV = "FLAKY_MARKER"  # while this file exists, fail_while_marker fails
EFFECTS_ENV = "FLAKY_EFFECTS"  # fail_while_marker appends one line per call that succeeded


def effects_table_ddl(dialect: str) -> str:
    """The side table record_effect writes to, in the batch's transaction. No unique key on
    event_id on purpose: an effect applied twice shows up as two rows; ``id`` gives the
    order effects were written in."""
    serial = "BIGSERIAL" if dialect == "postgresql" else "INTEGER"
    return (
        "CREATE TABLE IF NOT EXISTS handler_effects ("
        f" id {serial} PRIMARY KEY,"
        " event_id VARCHAR(36) NOT NULL,"
        " aggregate_id VARCHAR(500) NOT NULL,"
        " seq INTEGER NOT NULL,"
        " worker VARCHAR(100) NOT NULL)"
    )


async def fail_while_marker(event: EventEnvelope) -> None:
    """Raises while the marker file exists (the bug); afterwards (the fix) appends the
    event id to the effects file: a side effect outside the database."""
    marker = Path(os.environ[MARKER_ENV])
    if marker.exists():
        raise RuntimeError(f"downstream unavailable while {marker.name} exists (event {event.id})")
    with Path(os.environ[EFFECTS_ENV]).open("a", encoding="utf-8") as effects:
        effects.write(f"{event.id}\n")


async def record_effect(event: EventEnvelope) -> None:
    """Inserts one handler_effects row in the batch's transaction: committed together with
    the event's processed_events row, so it exists exactly once per event id."""
    await transaction().execute(
        text(
            "INSERT INTO handler_effects (event_id, aggregate_id, seq, worker) "
            "VALUES (:event_id, :aggregate_id, :seq, :worker)"
        ),
        {
            "event_id": str(event.id),
            "aggregate_id": event.aggregate_id,
            "seq": int(event.data.get("seq", -1)),
            "worker": os.environ.get("WEB_PORT", "in-process"),
        },
    )
