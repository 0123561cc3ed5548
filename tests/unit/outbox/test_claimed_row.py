"""What a claimed outbox row becomes on the wire: its headers."""

from __future__ import annotations

import json

from holdwall_stream.outbox.store import (
    ClaimedRow,
    kafka_headers,
    oldest_written_at,
    row_ids,
)

EVENT_ID = b"4f6f3c2e-8a61-4df4-9a3e-7f0b6a1c2d3e"


def _row(
    headers: dict[str, object] | None,
    payload: bytes = b"{}",
    row_id: int = 7,
    written_at: float = 0.0,
) -> ClaimedRow:
    text = json.dumps(headers).encode() if headers is not None else None
    return (row_id, EVENT_ID, b"order-42", payload, text, 0, written_at)


def _headers(row: ClaimedRow) -> list[tuple[str, bytes]]:
    return kafka_headers(row[1], row[4])


def test_the_event_id_header_comes_from_its_column_and_goes_first() -> None:
    assert _headers(_row({"event-type": "order.created"})) == [
        ("event-id", EVENT_ID),
        ("event-type", b"order.created"),
    ]


def test_a_row_without_headers_still_carries_its_event_id() -> None:
    assert _headers(_row(None)) == [("event-id", EVENT_ID)]
    assert _headers(_row({})) == [("event-id", EVENT_ID)]


def test_an_event_id_stored_in_the_headers_is_not_sent_twice() -> None:
    """Rows written before the event id moved to its column keep it in the JSON too."""
    row = _row({"event-id": "something-else", "event-type": "order.created"})
    assert _headers(row) == [("event-id", EVENT_ID), ("event-type", b"order.created")]


def test_header_values_that_are_not_strings_are_sent_as_text() -> None:
    row = _row({"attempt": 3, "replayed": True})
    assert _headers(row)[1:] == [("attempt", b"3"), ("replayed", b"True")]


def test_ids_and_oldest_write_of_a_batch() -> None:
    rows = [_row(None, row_id=3, written_at=20.0), _row(None, row_id=4, written_at=10.0)]
    assert row_ids(rows) == [3, 4]
    assert oldest_written_at(rows) == 10.0
