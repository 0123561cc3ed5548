"""Circuit breaker: every transition, the single half-open trial, logs, and a state machine."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from holdwall_stream.errors import CircuitOpenError
from holdwall_stream.resilience.breaker import BreakerState, CircuitBreaker

START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LEGAL = {
    (BreakerState.CLOSED, BreakerState.OPEN),
    (BreakerState.OPEN, BreakerState.HALF_OPEN),
    (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    (BreakerState.HALF_OPEN, BreakerState.OPEN),
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return START + timedelta(seconds=self.now - 1000.0)


Transition = tuple[BreakerState, BreakerState, dict[str, Any]]


def make(
    clock: FakeClock, threshold: int = 3, timeout: float = 10.0
) -> tuple[CircuitBreaker, list[Transition]]:
    breaker = CircuitBreaker(threshold, timeout, clock=clock, wall_clock=clock.wall)
    seen: list[Transition] = []
    breaker.on_transition.append(lambda old, new, snap: seen.append((old, new, snap)))
    return breaker, seen


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(ConnectionError("broker down"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_starts_closed(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.snapshot() == {
        "state": "closed",
        "consecutive_failures": 0,
        "total_failures": 0,
        "opened_at": None,
        "last_error": None,
        "retry_in_s": 0.0,
    }


def test_state_is_a_str_enum() -> None:
    assert BreakerState.HALF_OPEN == "half_open"
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]


def test_failures_below_threshold_stay_closed_and_success_resets(clock: FakeClock) -> None:
    breaker, seen = make(clock, threshold=3)
    breaker.record_failure("one")
    breaker.record_failure("two")
    assert breaker.state is BreakerState.CLOSED
    breaker.record_success()
    breaker.record_failure("three")
    breaker.record_failure("four")
    assert breaker.state is BreakerState.CLOSED
    snap = breaker.snapshot()
    assert (snap["consecutive_failures"], snap["total_failures"]) == (2, 4)
    assert snap["last_error"] == "four"
    assert seen == []


def test_closed_to_open_at_threshold(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="holdwall_stream.breaker")
    breaker, seen = make(clock, threshold=3, timeout=10)
    trip(breaker)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["opened_at"] == START.isoformat()
    assert snap["retry_in_s"] == 10.0
    assert snap["last_error"] == "ConnectionError: broker down"
    assert [(old, new) for old, new, _ in seen] == [(BreakerState.CLOSED, BreakerState.OPEN)]
    assert seen[0][2] == snap
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.name == "holdwall_stream.breaker"
    assert record.getMessage() == (
        "Kafka circuit breaker closed -> open after 3 consecutive failures: "
        "ConnectionError: broker down"
    )


def test_open_refuses_until_timeout_then_half_opens(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker, seen = make(clock, timeout=10)
    trip(breaker)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="holdwall_stream.breaker")
    clock.now += 9.5
    assert not breaker.allow()
    assert breaker.snapshot()["retry_in_s"] == 0.5
    clock.now += 0.5
    assert breaker.snapshot()["retry_in_s"] == 0.0
    assert breaker.state is BreakerState.OPEN  # only allow() moves it
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert seen[-1][:2] == (BreakerState.OPEN, BreakerState.HALF_OPEN)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "circuit breaker open -> half_open" in record.getMessage()


def test_half_open_allows_one_trial_at_a_time(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    trip(breaker)
    clock.now += 10
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.snapshot()["opened_at"] == START.isoformat()


def test_abandoned_trial_is_replaced_after_the_reset_timeout(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that took the trial via allow() and never reported must not wedge it."""
    breaker, seen = make(clock, timeout=10)
    trip(breaker)
    clock.now += 10
    assert breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    caplog.set_level(logging.INFO, logger="holdwall_stream.breaker")
    caplog.clear()
    clock.now += 0.1
    assert breaker.allow()
    assert not breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert len(seen) == 2  # no transition, just a new trial
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "half_open trial call reported no result within 10s" in record.getMessage()


def test_half_open_success_closes(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    breaker, seen = make(clock)
    trip(breaker)
    clock.now += 10
    assert breaker.allow()
    caplog.set_level(logging.INFO, logger="holdwall_stream.breaker")
    caplog.clear()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()
    snap = breaker.snapshot()
    assert snap["opened_at"] is None
    assert snap["consecutive_failures"] == 0
    assert snap["total_failures"] == 3
    assert snap["last_error"] == "ConnectionError: broker down"  # kept as history
    assert seen[-1][:2] == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "Kafka circuit breaker half_open -> closed after a successful trial call"
    )


def test_half_open_failure_reopens_and_restarts_timer(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker, seen = make(clock, timeout=10)
    trip(breaker)
    clock.now += 12
    assert breaker.allow()
    caplog.set_level(logging.INFO, logger="holdwall_stream.breaker")
    caplog.clear()
    breaker.record_failure(TimeoutError("still down"))
    assert breaker.state is BreakerState.OPEN
    snap = breaker.snapshot()
    assert snap["retry_in_s"] == 10.0
    assert snap["opened_at"] == (START + timedelta(seconds=12)).isoformat()
    assert snap["consecutive_failures"] == 4
    assert seen[-1][:2] == (BreakerState.HALF_OPEN, BreakerState.OPEN)
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    (record, half_open) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "Kafka circuit breaker half_open -> open after the trial call failed, "
        "next trial in 10s: TimeoutError: still down"
    )
    assert "open -> half_open" in half_open.getMessage()


def test_late_results_while_open_do_not_move_the_state(clock: FakeClock) -> None:
    breaker, seen = make(clock, timeout=10)
    trip(breaker)
    clock.now += 4
    breaker.record_success()
    assert breaker.state is BreakerState.OPEN
    breaker.record_failure("late")
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["retry_in_s"] == 6.0  # timer not restarted
    assert len(seen) == 1


def test_last_error_is_one_line_and_truncated(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    breaker.record_failure(RuntimeError("x" * 2000))
    last = breaker.snapshot()["last_error"]
    assert len(last) == 500
    assert last.startswith("RuntimeError: xxx") and last.endswith("...")
    breaker.record_failure(OSError())
    assert breaker.snapshot()["last_error"] == "OSError"
    breaker.record_failure("multi\nline\n  error")
    assert breaker.snapshot()["last_error"] == "multi line error"


def test_failing_callback_is_logged_and_does_not_break_the_breaker(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker, seen = make(clock)

    def broken(old: BreakerState, new: BreakerState, snap: dict[str, Any]) -> None:
        raise ValueError("callback bug")

    breaker.on_transition.insert(0, broken)
    trip(breaker)
    assert breaker.state is BreakerState.OPEN
    assert len(seen) == 1  # later callbacks still ran
    assert any("callback" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("threshold", "timeout"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_rejects_bad_config(threshold: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, timeout)


# --- call() ---


async def test_call_returns_and_records_success(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    breaker.record_failure("one")

    async def ok() -> int:
        return 42

    assert await breaker.call(ok) == 42
    assert breaker.snapshot()["consecutive_failures"] == 0


async def test_call_records_failure_and_reraises(clock: FakeClock) -> None:
    breaker, _ = make(clock, threshold=1)

    async def boom() -> None:
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        await breaker.call(boom)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["last_error"] == "ConnectionError: refused"


async def test_call_refuses_when_open_without_calling(clock: FakeClock) -> None:
    breaker, _ = make(clock, timeout=10)
    trip(breaker)
    called = False

    async def fn() -> None:
        nonlocal called
        called = True

    with pytest.raises(CircuitOpenError, match=r"circuit breaker is open, next trial in 10\.0s"):
        await breaker.call(fn)
    assert not called
    assert breaker.snapshot()["total_failures"] == 3  # a refusal is not a failure


async def test_call_half_open_runs_a_single_trial(clock: FakeClock) -> None:
    breaker, _ = make(clock, timeout=10)
    trip(breaker)
    clock.now += 10
    release = asyncio.Event()
    calls = 0

    async def trial() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "ok"

    first = asyncio.create_task(breaker.call(trial))
    await asyncio.sleep(0)
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError, match="trial call is in progress"):
        await breaker.call(trial)
    release.set()
    assert await first == "ok"
    assert calls == 1
    assert breaker.state is BreakerState.CLOSED


async def test_cancelled_trial_frees_the_slot(clock: FakeClock) -> None:
    breaker, _ = make(clock, timeout=10)
    trip(breaker)
    clock.now += 10

    async def hang() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hang))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.snapshot()["total_failures"] == 3
    assert breaker.allow()  # a new trial may go
    assert not breaker.allow()


async def test_cancelled_stale_trial_does_not_free_a_newer_one(clock: FakeClock) -> None:
    breaker, _ = make(clock, timeout=10)
    trip(breaker)
    clock.now += 10

    async def hang() -> None:
        await asyncio.Event().wait()

    stale = asyncio.create_task(breaker.call(hang))
    await asyncio.sleep(0)
    breaker.record_failure("another caller failed")  # half_open -> open
    clock.now += 10
    assert breaker.allow()  # the newer trial
    stale.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stale
    assert not breaker.allow()


# --- property: the state always agrees with the history ---


class BreakerMachine(RuleBasedStateMachine):
    """Drives the breaker with random calls, results and clock steps, then checks that
    what it reports follows from the history of what happened."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.threshold = 2
        self.timeout = 5.0
        self.breaker = CircuitBreaker(
            self.threshold, self.timeout, clock=self.clock, wall_clock=self.clock.wall
        )
        self.transitions: list[Transition] = []
        self.breaker.on_transition.append(
            lambda old, new, snap: self.transitions.append((old, new, snap))
        )
        self.failures = 0
        self.failures_since_success = 0
        self.opened_at_time: float | None = None
        self.trial_since: float | None = None  # when the model's current trial was granted

    def _record_new_transitions(self, before: int) -> None:
        for old, new, _ in self.transitions[before:]:
            if new is BreakerState.OPEN:
                self.opened_at_time = self.clock.now
            if new is BreakerState.HALF_OPEN:
                assert old is BreakerState.OPEN
                assert self.opened_at_time is not None
                assert self.clock.now - self.opened_at_time >= self.timeout
            self.trial_since = None

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 7.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    def _trial_slot_free(self) -> bool:
        """No trial in flight, or the one in flight is presumed abandoned."""
        return self.trial_since is None or self.clock.now - self.trial_since >= self.timeout

    @rule()
    def allow(self) -> None:
        state_before, slot_free = self.breaker.state, self._trial_slot_free()
        before = len(self.transitions)
        allowed = self.breaker.allow()
        self._record_new_transitions(before)
        if state_before is BreakerState.CLOSED:
            assert allowed
        if state_before is BreakerState.HALF_OPEN:
            assert allowed == slot_free, "half-open must grant exactly one trial at a time"
        if state_before is BreakerState.OPEN:
            assert self.opened_at_time is not None
            assert allowed == (self.clock.now - self.opened_at_time >= self.timeout)
        if allowed and self.breaker.state is BreakerState.HALF_OPEN:
            self.trial_since = self.clock.now

    @rule()
    def success(self) -> None:
        state_before = self.breaker.state
        before = len(self.transitions)
        self.breaker.record_success()
        self._record_new_transitions(before)
        self.failures_since_success = 0
        expected = {
            BreakerState.CLOSED: BreakerState.CLOSED,
            BreakerState.OPEN: BreakerState.OPEN,
            BreakerState.HALF_OPEN: BreakerState.CLOSED,
        }[state_before]
        assert self.breaker.state is expected

    @rule()
    def failure(self) -> None:
        state_before = self.breaker.state
        before = len(self.transitions)
        self.breaker.record_failure(f"failure {self.failures}")
        self.failures += 1
        self.failures_since_success += 1
        if state_before is BreakerState.HALF_OPEN or (
            state_before is BreakerState.CLOSED and self.failures_since_success >= self.threshold
        ):
            assert len(self.transitions) == before + 1
        else:
            assert len(self.transitions) == before
        self._record_new_transitions(before)
        if state_before is not BreakerState.CLOSED:
            assert self.breaker.state is BreakerState.OPEN

    @rule()
    def cancelled_call(self) -> None:
        """A call() whose operation is cancelled: neither success nor failure."""

        async def cancelled() -> None:
            raise asyncio.CancelledError

        state_before, slot_free = self.breaker.state, self._trial_slot_free()
        before = len(self.transitions)
        call = self.breaker.call(cancelled)
        with pytest.raises((CircuitOpenError, asyncio.CancelledError)) as raised:
            call.send(None)
        self._record_new_transitions(before)
        if raised.type is CircuitOpenError:
            assert state_before is BreakerState.OPEN or (
                state_before is BreakerState.HALF_OPEN and not slot_free
            )
        elif self.breaker.state is BreakerState.HALF_OPEN:
            # it was the trial and gave the slot back
            assert state_before is BreakerState.OPEN or slot_free
            self.trial_since = None
        assert self.breaker.state is not BreakerState.OPEN or state_before is BreakerState.OPEN

    @invariant()
    def counters_match_history(self) -> None:
        snap = self.breaker.snapshot()
        assert snap["total_failures"] == self.failures
        assert snap["consecutive_failures"] == self.failures_since_success
        if self.failures:
            assert snap["last_error"] == f"failure {self.failures - 1}"

    @invariant()
    def state_matches_history(self) -> None:
        state = self.breaker.state
        snap = self.breaker.snapshot()
        assert snap["state"] == state.value
        previous = BreakerState.CLOSED
        for old, new, transition_snap in self.transitions:
            assert (old, new) in LEGAL
            assert old is previous
            assert transition_snap["state"] == new.value
            previous = new
        assert state is previous
        if state is BreakerState.CLOSED:
            assert snap["opened_at"] is None
            assert snap["consecutive_failures"] < self.threshold
            assert snap["retry_in_s"] == 0
        else:
            assert snap["opened_at"] is not None
        if state is BreakerState.OPEN:
            assert self.opened_at_time is not None
            expected = max(0.0, self.timeout - (self.clock.now - self.opened_at_time))
            assert snap["retry_in_s"] == pytest.approx(expected, abs=1e-3)


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_breaker_state_machine = BreakerMachine.TestCase
