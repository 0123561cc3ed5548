"""Importable handlers for the PIPELINE_HANDLERS tests."""

from __future__ import annotations

from holdwall_stream.pipeline.envelope import EventEnvelope

seen: list[EventEnvelope] = []
NOT_CALLABLE = 42


async def on_order_created(event: EventEnvelope) -> None:
    seen.append(event)


async def on_order_paid(event: EventEnvelope) -> None:
    seen.append(event)


def sync_handler(event: EventEnvelope) -> None:
    seen.append(event)


class Handlers:
    @staticmethod
    async def on_shipped(event: EventEnvelope) -> None:
        seen.append(event)


class AsyncCallable:
    async def __call__(self, event: EventEnvelope) -> None:
        seen.append(event)


callable_object = AsyncCallable()
