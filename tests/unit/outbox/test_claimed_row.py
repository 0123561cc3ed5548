"""What a claimed outbox row becomes on the wire: its headers and its size."""

from __future__ import annotations

import json

from holdwall_stream.outbox.store import ClaimedRow, all_fit

EVENT_ID = "4f6f3c2e-8a61-4df4-9a3e-7f0b6a1c2d3e"


def _row(headers: dict[str, object] | None, payload: bytes = b"{}") -> ClaimedRow:
    text = json.dumps(headers) if headers is not None else None
    return ClaimedRow(7, EVENT_ID, b"order-42", payload, text, 0, 0.0)


def test_the_event_id_header_comes_from_its_column_and_goes_first() -> None:
    assert _row({"event-type": "order.created"}).kafka_headers() == [
        ("event-id", EVENT_ID.encode()),
        ("event-type", b"order.created"),
    ]


def test_a_row_without_headers_still_carries_its_event_id() -> None:
    assert _row(None).kafka_headers() == [("event-id", EVENT_ID.encode())]
    assert _row({}).kafka_headers() == [("event-id", EVENT_ID.encode())]


def test_an_event_id_stored_in_the_headers_is_not_sent_twice() -> None:
    """Rows written before the event id moved to its column keep it in the JSON too."""
    row = _row({"event-id": "something-else", "event-type": "order.created"})
    assert row.kafka_headers() == [
        ("event-id", EVENT_ID.encode()),
        ("event-type", b"order.created"),
    ]


def test_header_values_that_are_not_strings_are_sent_as_text() -> None:
    row = _row({"attempt": 3, "replayed": True})
    assert row.kafka_headers()[1:] == [("attempt", b"3"), ("replayed", b"True")]


def test_size_counts_key_value_and_every_header() -> None:
    row = _row({"event-type": "order.created"}, payload=b"x" * 100)
    expected = len(b"order-42") + 100 + len("event-id") + 36 + len("event-type") + 13
    assert row.size == expected
    assert row.rough_size >= row.size, "the cheap bound never underestimates"
    assert row.fits(expected) and not row.fits(expected - 1)


def test_all_fit_finds_the_one_row_over_the_limit() -> None:
    small = _row({"event-type": "t"}, payload=b"x" * 10)
    large = _row({"event-type": "t"}, payload=b"x" * 2000)
    assert all_fit([small, small], 1024)
    assert not all_fit([small, large, small], 1024)
    assert all_fit([], 1)
