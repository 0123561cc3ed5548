"""An outage is one warning when it starts and one when it ends, whatever the retries."""

from __future__ import annotations

import logging

import pytest

from holdwall_stream.observability.outage_log import OutageLog


def test_many_failed_retries_are_one_warning_and_the_recovery_another(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = OutageLog(logging.getLogger("test.outage"), "The database")
    outage.succeeded()  # nothing was wrong: nothing to say
    with caplog.at_level(logging.DEBUG, logger="test.outage"):
        for attempt in range(50):
            outage.failed(f"connection refused ({attempt})")
        assert outage.ongoing
        outage.succeeded()
        outage.succeeded()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0] == (
        "The database unavailable, retrying until it is back: connection refused (0)"
    )
    assert warnings[1].startswith("The database available again after ")
    assert warnings[1].endswith("(50 failed attempts)")
    assert len(warnings) == 2
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 49
    assert not outage.ongoing


def test_a_second_outage_is_reported_again(caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(logging.getLogger("test.outage"), "The database")
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        outage.failed("first")
        outage.succeeded()
        outage.failed("second")
    assert [r.getMessage().split(":")[-1].strip() for r in caplog.records][::2] == [
        "first",
        "second",
    ]
