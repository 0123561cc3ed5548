"""Backoff: the ceiling doubles from base to max, and the draw stays inside it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from holdwall_stream.resilience.backoff import backoff_delay


class _Top(random.Random):
    """Always draws the top of the range, exposing the ceiling."""

    def random(self) -> float:
        return 1.0


class _Bottom(random.Random):
    def random(self) -> float:
        return 0.0


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.6), (6, 2.0), (50, 2.0), (10_000, 2.0)],
)
def test_ceiling_doubles_and_is_capped(attempt: int, ceiling: float) -> None:
    assert backoff_delay(attempt, 0.1, 2.0, _Top()) == pytest.approx(ceiling)


def test_full_jitter_can_reach_zero() -> None:
    assert backoff_delay(7, 0.1, 2.0, _Bottom()) == 0.0


def test_same_seed_same_delays() -> None:
    first = [backoff_delay(n, 0.5, 30.0, random.Random(42)) for n in range(1, 10)]
    again = [backoff_delay(n, 0.5, 30.0, random.Random(42)) for n in range(1, 10)]
    assert first == again


def test_delays_are_spread_not_constant() -> None:
    rng = random.Random(1)
    delays = {backoff_delay(3, 1.0, 30.0, rng) for _ in range(50)}
    assert len(delays) > 40
    assert all(0.0 <= d <= 4.0 for d in delays)


def test_zero_base_means_no_wait() -> None:
    assert backoff_delay(20, 0.0, 10.0) == 0.0


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [(0, 1.0, 2.0), (-1, 1.0, 2.0), (1, -1.0, 2.0), (1, 1.0, -2.0), (1, float("nan"), 2.0)],
)
def test_rejects_nonsense(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, base, cap)


@given(
    attempt=st.integers(min_value=1, max_value=100_000),
    base=st.floats(min_value=0, max_value=1e6),
    cap=st.floats(min_value=0, max_value=1e6),
    seed=st.integers(),
)
def test_delay_always_within_bounds(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt - 1, 1023))
