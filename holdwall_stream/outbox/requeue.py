"""Handing a parked outbox row back to the relay once the broker takes it.

The relay parks a row larger than KAFKA_MAX_MESSAGE_BYTES (relay._dead_letter) and sends
a ``too_large`` dead letter without its payload; the payload stays in the row. After the
limit is raised (here and on the broker), `holdwall-stream dlq replay` of that dead letter
comes here instead of re-sending a message it never had.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from aiokafka.producer.message_accumulator import BatchBuilder
from sqlalchemy.ext.asyncio import AsyncConnection

from holdwall_stream.errors import RequeueRefusedError
from holdwall_stream.outbox import store
from holdwall_stream.outbox.batches import record_batches


async def requeue_parked_event(
    connection: AsyncConnection,
    event_id: uuid.UUID,
    create_batch: Callable[[], BatchBuilder],
    limit: int,
) -> None:
    """Hands the parked outbox row of ``event_id`` back to the relay.

    Refused while its record batch is still over ``limit`` (this process's
    KAFKA_MAX_MESSAGE_BYTES; ``create_batch`` makes batches of that size, as the relay's
    do): the relay would only park it again. A worker still on the old limit parks it
    again all the same, with a new dead letter.
    """
    row = await store.parked_row(connection, event_id)
    if row is None:
        raise RequeueRefusedError(
            f"the outbox holds no parked row of event {event_id}: already handed back to the "
            "relay (see `holdwall-stream outbox status`), or deleted"
        )
    _batches, too_large = record_batches(create_batch, [row], limit)
    if too_large:
        raise RequeueRefusedError(
            f"the outbox row of event {event_id} is {too_large[0].batch_bytes} bytes as a "
            f"record batch, still over KAFKA_MAX_MESSAGE_BYTES={limit}: raise it, and the "
            "broker's message.max.bytes, on the workers and here, then replay again"
        )
    await store.requeue_parked(connection, row[0])
