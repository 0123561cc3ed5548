"""One warning when a dependency becomes unavailable and one when it is back.

A loop that retries every poll interval would otherwise log a traceback per retry: a
five-minute database failover was ~100,000 log lines from one worker's relay.
"""

from __future__ import annotations

import logging
import time


class OutageLog:
    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self._what = what
        self._since: float | None = None
        self._failures = 0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, detail: str) -> None:
        """A retry failed: a warning the first time, then debug lines until it is back."""
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning("%s unavailable, retrying until it is back: %s", self._what, detail)
        else:
            self._log.debug("%s still unavailable: %s", self._what, detail)

    def succeeded(self) -> None:
        if self._since is None:
            return
        self._log.warning(
            "%s available again after %.1f s (%d failed attempts)",
            self._what,
            time.monotonic() - self._since,
            self._failures,
        )
        self._since, self._failures = None, 0
