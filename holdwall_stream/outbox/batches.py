"""Claimed rows into Kafka record batches that a broker with KAFKA_MAX_MESSAGE_BYTES accepts.

Kafka's ``message.max.bytes`` limits a whole record batch, not a record: a batch filled
past it is rejected as a whole, on every retry, and its partition would stall. The
producer's batches hold at most the limit (messaging/producer.py). aiokafka's builder
takes the first record of an empty batch whatever its size, so a row that cannot be
sent at all ends up alone in a batch over the limit: that is how it is found, at no cost
per row (no separate pass over the batch's sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka.producer.message_accumulator import BatchBuilder

from holdwall_stream.outbox.store import ClaimedRow, kafka_headers


@dataclass(frozen=True)
class TooLarge:
    """A row no broker with the limit accepts: its record batch of its own is this big."""

    row: ClaimedRow
    batch_bytes: int


def record_batches(
    create_batch: Callable[[], BatchBuilder], rows: Sequence[ClaimedRow], limit: int
) -> tuple[list[BatchBuilder], list[TooLarge]]:
    """The rows in order as closed record batches, and the rows over ``limit`` (left out).

    ``create_batch`` makes an empty batch holding up to ``limit`` bytes (the producer's
    ``create_batch`` with ``max_batch_size`` = KAFKA_MAX_MESSAGE_BYTES). All batches are
    built before any is sent, so the rows too large can be parked first: were parking to
    fail after the batches went out, every retry would publish them again.
    """
    batches: list[BatchBuilder] = []
    too_large: list[TooLarge] = []
    batch = create_batch()
    append = batch.append
    first = 0  # index of the current batch's first row
    for index, (_id, event_id, key, payload, headers_json, _attempts, _written_at) in enumerate(
        rows
    ):
        headers = kafka_headers(event_id, headers_json)
        if append(key=key, value=payload, timestamp=None, headers=headers) is None:  # full
            _finish(batch, rows[first], limit, batches, too_large)
            batch = create_batch()
            append = batch.append
            first = index
            append(key=key, value=payload, timestamp=None, headers=headers)  # empty: taken
    if batch.record_count():
        _finish(batch, rows[first], limit, batches, too_large)
    return batches, too_large


def _finish(
    batch: BatchBuilder,
    first_row: ClaimedRow,
    limit: int,
    batches: list[BatchBuilder],
    too_large: list[TooLarge],
) -> None:
    batch.close()
    size = batch.size()
    if size > limit:  # only a batch's first record can take it over the limit: it is alone
        too_large.append(TooLarge(first_row, size))
    else:
        batches.append(batch)
