"""User processing functions, one per event type, registered in code or by PIPELINE_HANDLERS.

Registration fails loudly at startup (HandlerConfigError) rather than at the first event,
so a typo in a setting or a sync function never reaches the consumer loop.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeVar

from holdwall_stream.errors import HandlerConfigError
from holdwall_stream.pipeline.envelope import EventEnvelope

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

Handler = Callable[[EventEnvelope], Awaitable[None]]
H = TypeVar("H", bound=Handler)

SETTING = "PIPELINE_HANDLERS"
EXPECTED_FORMAT = (
    "expected comma-separated event.type=package.module:function entries, "
    "e.g. order.created=myapp.handlers:on_order_created"
)
MAX_TYPE_CHARS = 200  # the envelope's limit on ``type``


class PermanentHandlerError(Exception):
    """Raised by a handler for an event that can never succeed (e.g. it breaks a business
    rule): the pipeline parks it in the DLQ at once. Any other exception is transient and
    is retried."""


class HandlerTimeoutError(Exception):
    """A handler attempt outlived PIPELINE_HANDLER_TIMEOUT_MS and was given up; retried like
    any transient failure, then parked in the DLQ (``handler_failed``)."""


_transaction: ContextVar[AsyncConnection | None] = ContextVar(
    "holdwall_pipeline_transaction", default=None
)


def transaction() -> AsyncConnection:
    """The database connection of the batch a handler is running in, inside its transaction.

    Writes made through it commit in the same transaction as the event's processed_events
    row, so they take effect exactly once however often the event is delivered, and they
    are rolled back if the handler raises (each attempt runs in a savepoint). Use it from a
    handler only; outside one it raises RuntimeError.
    """
    connection = _transaction.get()
    if connection is None:
        raise RuntimeError("transaction() is only available while a pipeline handler runs")
    return connection


@contextmanager
def bind_transaction(connection: AsyncConnection) -> Iterator[None]:
    """Makes ``connection`` what :func:`transaction` returns, for the handler call inside."""
    token = _transaction.set(connection)
    try:
        yield
    finally:
        _transaction.reset(token)


class HandlerRegistry:
    """Maps an event type to its single async handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, event_type: str) -> Callable[[H], H]:
        """Decorator form of :meth:`add`: ``@handler("order.created")``."""

        def decorator(fn: H) -> H:
            self.add(event_type, fn)
            return fn

        return decorator

    def add(self, event_type: str, fn: Handler) -> None:
        """Registers ``fn`` for ``event_type``; registering the same function again is a
        no-op, a different one raises HandlerConfigError."""
        problem = self._problem(event_type, fn)
        if problem:
            raise HandlerConfigError(problem)
        self._handlers[event_type] = fn

    def get(self, event_type: str) -> Handler | None:
        return self._handlers.get(event_type)

    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self._handlers))

    def load_from_setting(self, spec: str) -> None:
        """Imports and registers every ``event.type=package.module:function`` entry.

        All entries are checked before any is registered, so a bad setting registers none
        of them (modules it imported may still have registered themselves via @handler).
        """
        resolved: dict[str, Handler] = {}
        for entry in (part.strip() for part in spec.split(",")):
            if not entry:
                continue
            event_type, fn = _resolve(entry)
            if event_type in resolved:
                raise _entry_error(entry, f"event type {event_type!r} is listed twice")
            problem = self._problem(event_type, fn)
            if problem:
                raise _entry_error(entry, problem)
            resolved[event_type] = fn
        self._handlers.update(resolved)

    def _problem(self, event_type: str, fn: object) -> str | None:
        if (
            not isinstance(event_type, str)
            or not event_type
            or event_type != event_type.strip()
            or len(event_type) > MAX_TYPE_CHARS
        ):
            return (
                f"event type must be a non-empty string without surrounding whitespace, "
                f"up to {MAX_TYPE_CHARS} characters, got {event_type!r}"
            )
        if not _is_async_callable(fn):
            return f"handler {_name(fn)} for {event_type!r} must be an async function (async def)"
        existing = self._handlers.get(event_type)
        if existing is not None and existing != fn:
            return (
                f"event type {event_type!r} already has handler {_name(existing)}; "
                f"cannot also register {_name(fn)} (one handler per event type)"
            )
        return None


def _resolve(entry: str) -> tuple[str, Handler]:
    """Parses and imports one PIPELINE_HANDLERS entry."""
    event_type, has_eq, target = (part.strip() for part in entry.partition("="))
    module_name, has_colon, attribute = (part.strip() for part in target.partition(":"))
    if not (has_eq and has_colon and event_type and module_name and attribute):
        raise _entry_error(entry, "it is not of the form event.type=package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise _entry_error(entry, f"module {module_name!r} not found") from exc
        raise _entry_error(entry, f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise _entry_error(
            entry, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    fn: object = module
    for part in attribute.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            raise _entry_error(
                entry, f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(fn):
        raise _entry_error(entry, f"{target} is a {type(fn).__name__}, not a function")
    return event_type, fn  # type: ignore[return-value]


def _entry_error(entry: str, problem: str) -> HandlerConfigError:
    return HandlerConfigError(f"{SETTING}: bad entry {entry!r}: {problem}; {EXPECTED_FORMAT}")


def _is_async_callable(fn: object) -> bool:
    """True for async functions, partials of them and objects with an async __call__."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - checks the method, not callability
    )


def _name(fn: object) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else repr(fn)


handlers = HandlerRegistry()
handler = handlers.register
