"""The libpq options that keep a silent PostgreSQL server from holding the worker forever."""

from __future__ import annotations

import pytest

from holdwall_stream.db.engine import silent_server_timeouts
from holdwall_stream.errors import SettingsError
from holdwall_stream.settings import load_settings

URL = "postgresql://holdwall:pw@db.internal:5432/holdwall"


def test_connecting_and_unanswered_data_are_bounded_by_database_timeout_ms() -> None:
    options = silent_server_timeouts(load_settings(database_url=URL, database_timeout_ms=9000))
    assert options == {
        "connect_timeout": 9,
        "keepalives": 1,
        "keepalives_idle": 9,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": 9000,
    }


def test_libpq_gets_whole_seconds_and_at_least_its_own_minimum() -> None:
    options = silent_server_timeouts(load_settings(database_url=URL, database_timeout_ms=1500))
    assert options["connect_timeout"] == 2  # libpq treats 1 s as 2 anyway
    assert options["keepalives_interval"] == 1
    assert options["tcp_user_timeout"] == 1500


def test_options_set_in_the_database_url_win() -> None:
    url = f"{URL}?connect_timeout=60&keepalives=0"
    options = silent_server_timeouts(load_settings(database_url=url))
    assert "connect_timeout" not in options and "keepalives" not in options
    assert options["tcp_user_timeout"] == 10_000  # the default


@pytest.mark.parametrize("value", ["0", "999", "600001", "ten seconds"])
def test_a_bad_timeout_names_the_variable(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_TIMEOUT_MS", value)
    with pytest.raises(SettingsError, match="DATABASE_TIMEOUT_MS"):
        load_settings()
