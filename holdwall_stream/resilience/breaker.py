"""A circuit breaker around Kafka calls, so a broker outage costs one fast refusal per call
instead of a full request timeout, and so health can report the outage as a state.

Single asyncio thread, no locks. The monotonic clock is injectable for tests; the wall
clock only feeds ``opened_at`` in snapshots.

Results arriving in a state that did not start the call are handled conservatively: a
late success while ``open`` does not close the breaker (only a half-open trial does), and
a late failure while ``open`` does not restart the timer. A half-open trial that reports
no result within ``reset_timeout_s`` (a caller that used ``allow()`` and then bailed out)
is presumed abandoned, so the breaker cannot stay half-open forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from holdwall_stream.errors import CircuitOpenError

logger = logging.getLogger("holdwall_stream.breaker")

T = TypeVar("T")
MAX_ERROR_CHARS = 500


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TransitionCallback = Callable[[BreakerState, BreakerState, dict[str, Any]], None]


def describe_error(error: BaseException | str) -> str:
    """One line for logs and health: ``Type: message``, at most MAX_ERROR_CHARS long."""
    if isinstance(error, BaseException):
        message = str(error).strip()
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    else:
        text = error
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``reset_timeout_s``
    lets one trial call through (half-open), which closes or re-opens it."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        *,
        name: str = "Kafka",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not reset_timeout_s > 0:
            raise ValueError(f"reset_timeout_s must be > 0, got {reset_timeout_s}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.name = name
        self.on_transition: list[TransitionCallback] = []
        self._clock = clock
        self._wall_clock = wall_clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._total_failures = 0
        self._last_error: str | None = None
        self._opened_at: datetime | None = None
        self._opened_monotonic = 0.0
        self._trial_in_flight = False
        self._trial_started = 0.0
        self._trial_id = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now; grants the single half-open trial."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if self._retry_in_s() > 0:
                return False
            self._start_trial()
            self._transition(
                BreakerState.HALF_OPEN,
                f"after {self.reset_timeout_s:g}s; allowing one trial call",
            )
            return True
        if self._trial_in_flight:
            if self._clock() - self._trial_started < self.reset_timeout_s:
                return False
            logger.warning(
                "%s circuit breaker half_open trial call reported no result within %gs; "
                "allowing another trial call",
                self.name,
                self.reset_timeout_s,
            )
        self._start_trial()
        return True

    def record_success(self) -> None:
        self._consecutive_failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight = False
            self._opened_at = None
            self._transition(BreakerState.CLOSED, "after a successful trial call")

    def record_failure(self, error: BaseException | str) -> None:
        self._consecutive_failures += 1
        self._total_failures += 1
        self._last_error = describe_error(error)
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            self._transition(
                BreakerState.OPEN,
                f"after the trial call failed, next trial in {self.reset_timeout_s:g}s: "
                f"{self._last_error}",
            )
        elif (
            self._state is BreakerState.CLOSED
            and self._consecutive_failures >= self.failure_threshold
        ):
            self._open()
            self._transition(
                BreakerState.OPEN,
                f"after {self._consecutive_failures} consecutive failures: {self._last_error}",
            )

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Runs ``fn`` if allowed, recording its outcome; raises CircuitOpenError if not.

        A cancelled (or otherwise BaseException-interrupted) half-open trial is neither a
        success nor a failure: it frees the trial slot so the next call can try.
        """
        if not self.allow():
            raise CircuitOpenError(self._refusal_message())
        trial_id = self._trial_id if self._trial_in_flight else None
        try:
            result = await fn()
        except Exception as exc:
            self.record_failure(exc)
            raise
        except BaseException:
            if trial_id is not None and self._trial_in_flight and self._trial_id == trial_id:
                self._trial_in_flight = False
            raise
        self.record_success()
        return result

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view for health, metrics and transition callbacks."""
        return {
            "state": self._state.value,
            "consecutive_failures": self._consecutive_failures,
            "total_failures": self._total_failures,
            "opened_at": self._opened_at.isoformat() if self._opened_at else None,
            "last_error": self._last_error,
            "retry_in_s": round(self._retry_in_s(), 3),
        }

    def _retry_in_s(self) -> float:
        if self._state is not BreakerState.OPEN:
            return 0.0
        elapsed = self._clock() - self._opened_monotonic
        return max(0.0, self.reset_timeout_s - elapsed)

    def _open(self) -> None:
        self._trial_in_flight = False
        self._opened_monotonic = self._clock()
        self._opened_at = self._wall_clock()

    def _start_trial(self) -> None:
        self._trial_in_flight = True
        self._trial_started = self._clock()
        self._trial_id += 1

    def _refusal_message(self) -> str:
        if self._state is BreakerState.OPEN:
            reason = f"open, next trial in {self._retry_in_s():.1f}s"
        else:
            reason = "half_open, a trial call is in progress"
        return (
            f"{self.name} circuit breaker is {reason}; call refused "
            f"(last error: {self._last_error or 'none'})"
        )

    def _transition(self, new: BreakerState, why: str) -> None:
        old, self._state = self._state, new
        level = logging.INFO if new is BreakerState.CLOSED else logging.WARNING
        logger.log(level, "%s circuit breaker %s -> %s %s", self.name, old.value, new.value, why)
        snapshot = self.snapshot()
        for callback in list(self.on_transition):
            try:
                callback(old, new, snapshot)
            except Exception:
                logger.exception(
                    "%s circuit breaker transition callback %r failed", self.name, callback
                )
