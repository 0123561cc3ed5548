"""Handler registry: decorator, duplicates, and the PIPELINE_HANDLERS setting."""

from __future__ import annotations

import functools
import sys
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest

from holdwall_stream.errors import HandlerConfigError
from holdwall_stream.pipeline import handlers as handlers_module
from holdwall_stream.pipeline.envelope import EventEnvelope
from holdwall_stream.pipeline.handlers import HandlerRegistry, PermanentHandlerError
from tests.unit.pipeline import sample_handlers

SAMPLE = "tests.unit.pipeline.sample_handlers"


def event(event_type: str = "order.created") -> EventEnvelope:
    return EventEnvelope(
        id=uuid4(),
        type=event_type,
        aggregate_id="order-1",
        occurred_at=datetime.now(UTC),
        data={},
    )


@pytest.fixture
def registry() -> HandlerRegistry:
    return HandlerRegistry()


async def test_decorator_registers_and_returns_the_function(registry: HandlerRegistry) -> None:
    calls: list[EventEnvelope] = []

    @registry.register("order.created")
    async def on_created(env: EventEnvelope) -> None:
        calls.append(env)

    found = registry.get("order.created")
    assert found is on_created
    env = event()
    await found(env)
    assert calls == [env]
    assert registry.get("order.paid") is None


def test_add_and_types(registry: HandlerRegistry) -> None:
    registry.add("order.paid", sample_handlers.on_order_paid)
    registry.add("order.created", sample_handlers.on_order_created)
    assert registry.types() == ("order.created", "order.paid")


def test_second_handler_for_a_type_is_refused(registry: HandlerRegistry) -> None:
    registry.add("order.created", sample_handlers.on_order_created)
    with pytest.raises(HandlerConfigError) as caught:
        registry.add("order.created", sample_handlers.on_order_paid)
    message = str(caught.value)
    assert "'order.created' already has handler" in message
    assert f"{SAMPLE}:on_order_created" in message
    assert f"{SAMPLE}:on_order_paid" in message
    assert registry.get("order.created") is sample_handlers.on_order_created


def test_registering_the_same_function_again_is_harmless(registry: HandlerRegistry) -> None:
    registry.add("order.created", sample_handlers.on_order_created)
    registry.add("order.created", sample_handlers.on_order_created)
    assert registry.types() == ("order.created",)


def test_sync_function_is_refused(registry: HandlerRegistry) -> None:
    with pytest.raises(HandlerConfigError, match="must be an async function"):
        registry.register("order.created")(sample_handlers.sync_handler)
    assert registry.types() == ()


def test_async_callables_are_accepted(registry: HandlerRegistry) -> None:
    registry.add("a", sample_handlers.callable_object)
    registry.add("b", functools.partial(sample_handlers.on_order_created))
    registry.add("c", sample_handlers.Handlers.on_shipped)
    assert registry.types() == ("a", "b", "c")


@pytest.mark.parametrize("event_type", ["", " order.created", "order.created ", "x" * 201])
def test_bad_event_type_is_refused(registry: HandlerRegistry, event_type: str) -> None:
    with pytest.raises(HandlerConfigError, match="event type must be"):
        registry.add(event_type, sample_handlers.on_order_created)


def test_module_level_registry_and_alias() -> None:
    assert isinstance(handlers_module.handlers, HandlerRegistry)
    assert handlers_module.handler == handlers_module.handlers.register


def test_permanent_handler_error_is_an_exception() -> None:
    assert issubclass(PermanentHandlerError, Exception)


# --- PIPELINE_HANDLERS ---


def test_load_from_setting(registry: HandlerRegistry) -> None:
    registry.load_from_setting(
        f" order.created = {SAMPLE}:on_order_created ,order.paid={SAMPLE} : on_order_paid,"
        f"order.shipped={SAMPLE}:Handlers.on_shipped, order.x={SAMPLE}:callable_object,"
    )
    assert registry.types() == ("order.created", "order.paid", "order.shipped", "order.x")
    assert registry.get("order.created") is sample_handlers.on_order_created
    assert registry.get("order.shipped") is sample_handlers.Handlers.on_shipped


@pytest.mark.parametrize("spec", ["", "  ", " , ,"])
def test_empty_setting_registers_nothing(registry: HandlerRegistry, spec: str) -> None:
    registry.load_from_setting(spec)
    assert registry.types() == ()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("order.created", "not of the form"),
        (f"{SAMPLE}:on_order_created", "not of the form"),
        ("order.created=", "not of the form"),
        (f"order.created={SAMPLE}", "not of the form"),
        (f"order.created={SAMPLE}:", "not of the form"),
        ("=tests:x", "not of the form"),
        (
            "order.created=no_such_package.handlers:fn",
            "module 'no_such_package.handlers' not found",
        ),
        ("order.created=tests.unit.nope:fn", "module 'tests.unit.nope' not found"),
        (f"order.created={SAMPLE}:missing", f"module '{SAMPLE}' has no attribute 'missing'"),
        (f"order.created={SAMPLE}:Handlers.missing", "has no attribute 'Handlers.missing'"),
        (f"order.created={SAMPLE}:NOT_CALLABLE", "is a int, not a function"),
        (f"order.created={SAMPLE}:sync_handler", "must be an async function"),
    ],
)
def test_bad_entry(registry: HandlerRegistry, entry: str, problem: str) -> None:
    with pytest.raises(HandlerConfigError) as caught:
        registry.load_from_setting(f"order.paid={SAMPLE}:on_order_paid, {entry}")
    message = str(caught.value)
    assert message.startswith(f"PIPELINE_HANDLERS: bad entry {entry!r}: ")
    assert problem in message
    assert "expected comma-separated event.type=package.module:function entries" in message
    assert "\n" not in message
    assert registry.types() == ()  # nothing half-registered


def test_type_listed_twice(registry: HandlerRegistry) -> None:
    with pytest.raises(HandlerConfigError, match=r"'order\.created' is listed twice"):
        registry.load_from_setting(
            f"order.created={SAMPLE}:on_order_created,order.created={SAMPLE}:on_order_paid"
        )


def test_setting_conflicting_with_a_registered_handler(registry: HandlerRegistry) -> None:
    registry.add("order.created", sample_handlers.on_order_created)
    with pytest.raises(HandlerConfigError, match=r"PIPELINE_HANDLERS: bad entry .*already has"):
        registry.load_from_setting(f"order.created={SAMPLE}:on_order_paid")
    registry.load_from_setting(f"order.created={SAMPLE}:on_order_created")  # same one: fine


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_module_that_fails_to_import(
    registry: HandlerRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch, "hw_broken_handlers", "raise RuntimeError('boom')\n")
    with pytest.raises(HandlerConfigError) as caught:
        registry.load_from_setting("a=hw_broken_handlers:fn")
    assert "importing 'hw_broken_handlers' failed: RuntimeError: boom" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_module_with_a_missing_dependency(
    registry: HandlerRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch, "hw_needs_dep", "import hw_not_installed_dep\n")
    with pytest.raises(HandlerConfigError) as caught:
        registry.load_from_setting("a=hw_needs_dep:fn")
    message = str(caught.value)
    assert "importing 'hw_needs_dep' failed" in message
    assert "hw_not_installed_dep" in message


def test_module_registering_itself_with_the_decorator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module using @handler may also be named in the setting without a conflict."""
    body = (
        "from holdwall_stream.pipeline.handlers import handler\n"
        "@handler('hw.self')\n"
        "async def on_self(event):\n"
        "    pass\n"
    )
    _write_module(tmp_path, monkeypatch, "hw_self_registering", body)
    registry = handlers_module.handlers
    monkeypatch.setattr(registry, "_handlers", {})
    registry.load_from_setting("hw.self=hw_self_registering:on_self")
    assert registry.types() == ("hw.self",)
