"""Record batches of claimed rows: never over the broker's limit, in order, a row that can
never fit reported instead of sent (aiokafka's own batch builder and decoder, no broker)."""

from __future__ import annotations

import json
from functools import partial

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from holdwall_stream.outbox.batches import TooLarge, record_batches
from holdwall_stream.outbox.store import ClaimedRow

LIMIT = 4096


def _row(row_id: int, payload_bytes: int) -> ClaimedRow:
    event_id = f"00000000-0000-4000-8000-{row_id:012d}".encode()
    headers = json.dumps({"event-type": "order.created"}).encode()
    return (row_id, event_id, f"key-{row_id}".encode(), b"p" * payload_bytes, headers, 0, 0.0)


def _builder(limit: int = LIMIT) -> BatchBuilder:
    """What the relay's producer hands out: a batch holding up to ``limit`` bytes."""
    return BatchBuilder(limit, 0)


def _batches(
    rows: list[ClaimedRow], limit: int = LIMIT
) -> tuple[list[BatchBuilder], list[TooLarge]]:
    return record_batches(partial(_builder, limit), rows, limit)


def _sent_keys(batches: list[BatchBuilder]) -> list[bytes]:
    return [key for batch in batches for key, _value, _headers in _decoded(batch)]


def _decoded(batch: BatchBuilder) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [
        (record.key, record.value, list(record.headers))
        for record in DefaultRecordBatch(bytearray(batch._build()))
    ]


def test_rows_fill_batches_up_to_the_limit_and_keep_their_order() -> None:
    rows = [_row(i, 300) for i in range(40)]
    batches, too_large = _batches(rows)

    assert too_large == []
    assert len(batches) > 1
    assert all(b.closed() for b in batches)
    assert all(len(b._build()) <= LIMIT for b in batches)
    records = [record for b in batches for record in _decoded(b)]
    assert [key for key, _value, _headers in records] == [row[2] for row in rows]
    assert records[5] == (
        b"key-5",
        b"p" * 300,
        [("event-id", rows[5][1]), ("event-type", b"order.created")],
    )


def test_a_row_that_cannot_fit_any_batch_is_reported_in_its_place_and_not_sent() -> None:
    rows = [_row(1, 300), _row(2, 300), _row(3, LIMIT * 2), _row(4, 300)]
    batches, [too_large] = _batches(rows)

    assert too_large.row == rows[2]
    assert too_large.batch_bytes > LIMIT * 2
    assert len(batches) == 2  # the rows before it, and the row after it
    assert _sent_keys(batches) == [b"key-1", b"key-2", b"key-4"]


@pytest.mark.parametrize("position", ["first", "last", "only"])
def test_a_row_too_large_is_found_wherever_it_is_in_the_claim(position: str) -> None:
    big = _row(9, LIMIT)
    small = [_row(1, 100), _row(2, 100)]
    rows = {"first": [big, *small], "last": [*small, big], "only": [big]}[position]

    batches, too_large = _batches(rows)

    assert [parked.row for parked in too_large] == [big]
    assert _sent_keys(batches) == [row[2] for row in rows if row is not big]


def test_the_limit_counts_the_batch_framing_as_the_broker_does() -> None:
    """A payload a little under the limit is still too large once it is a record batch:
    Kafka's message.max.bytes compares the whole batch."""
    [alone], _ = _batches([_row(1, 100)])
    framing = len(alone._build()) - 100

    [fits], none_too_large = _batches([_row(1, LIMIT - framing)])
    no_batches, [over] = _batches([_row(1, LIMIT - framing + 1)])

    assert none_too_large == []
    assert len(fits._build()) == LIMIT
    assert no_batches == []
    assert over.batch_bytes == LIMIT + 1


def test_no_rows_make_no_batches() -> None:
    assert _batches([]) == ([], [])
