"""Exponential backoff with full jitter, so retrying workers spread out instead of stampeding.

Full jitter (a uniform draw between 0 and the exponential ceiling) is the variant that
de-synchronises competing clients best; see the AWS Architecture Blog, "Exponential
Backoff And Jitter".
"""

from __future__ import annotations

import math
import random

# 2.0 ** 1023 is the largest finite power of two: beyond it the ceiling is the cap anyway.
_MAX_EXPONENT = 1023


def backoff_delay(
    attempt: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    The ceiling is ``base_s`` for attempt 1 and doubles per attempt, capped at ``max_s``;
    the delay is drawn uniformly from ``[0, ceiling]``. Pass ``rng`` for reproducible tests.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not (math.isfinite(base_s) and base_s >= 0):
        raise ValueError(f"base_s must be a finite number >= 0, got {base_s}")
    if not (math.isfinite(max_s) and max_s >= 0):
        raise ValueError(f"max_s must be a finite number >= 0, got {max_s}")
    ceiling = min(max_s, base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return (rng or random).uniform(0.0, ceiling)
