"""Settings: the checklist's names and defaults, one-line errors naming the variable,
the DATABASE_URL forms users write, and secrets that never show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from holdwall_stream.errors import SettingsError
from holdwall_stream.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SASL_SECRET = "sasl-s3cret-7f2b9c"
DB_SECRET = "db-s3cret-41d0e8"
_PREFIXES = ("KAFKA_", "DATABASE_URL", "OUTBOX_", "BREAKER_", "PIPELINE_", "API_", "WEB_")


def _is_setting(name: str) -> bool:
    return name.upper().startswith(_PREFIXES) or name.lower() in Settings.model_fields


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if _is_setting(name):
            monkeypatch.delenv(name)


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- defaults: the deployment checklist's table, names and values exact ---


def test_checklist_defaults() -> None:
    settings = load_settings()
    assert settings.kafka_enabled is False
    assert settings.kafka_brokers == "localhost:9092"
    assert settings.bootstrap_servers == ["localhost:9092"]
    assert settings.kafka_connection_timeout == 10_000
    assert settings.kafka_request_timeout == 30_000
    assert settings.kafka_ssl is False
    assert settings.kafka_tls is False
    assert settings.tls_enabled is False
    assert settings.kafka_sasl_mechanism is None
    assert settings.kafka_sasl_username is None
    assert settings.kafka_sasl_password is None
    assert settings.sasl_enabled is False
    assert settings.kafka_events_topic == "holdwall-events"
    assert settings.kafka_dlq_topic == "holdwall-dlq"
    assert settings.kafka_group_id == "holdwall-stream"
    assert settings.kafka_partitions == 3
    assert settings.kafka_validate_on_startup is False


def test_project_defaults() -> None:
    settings = load_settings()
    assert settings.database_url.get_secret_value() == "sqlite:///./holdwall.db"
    assert settings.database_dialect == "sqlite"
    assert settings.web_port == 3000
    assert not settings.faust_data_dir.is_absolute(), "data dir must follow the working dir"
    assert settings.api_max_batch == 1000
    assert settings.outbox_retention == 7 * 86400


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_ENABLED", "true")
    monkeypatch.setenv("KAFKA_BROKERS", "kafka-1:9092, kafka-2:9093")
    monkeypatch.setenv("KAFKA_PARTITIONS", "12")
    monkeypatch.setenv("OUTBOX_RETENTION", "12h")
    settings = load_settings()
    assert settings.kafka_enabled is True
    assert settings.bootstrap_servers == ["kafka-1:9092", "kafka-2:9093"]
    assert settings.kafka_partitions == 12
    assert settings.outbox_retention == 12 * 3600


# --- a bad value: one line naming the variable ---


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"KAFKA_PARTITIONS": "abc"}, "KAFKA_PARTITIONS"),
        ({"KAFKA_PARTITIONS": "0"}, "KAFKA_PARTITIONS"),
        ({"KAFKA_CONNECTION_TIMEOUT": "-5"}, "KAFKA_CONNECTION_TIMEOUT"),
        ({"KAFKA_REQUEST_TIMEOUT": "0"}, "KAFKA_REQUEST_TIMEOUT"),
        (
            {"KAFKA_REQUEST_TIMEOUT": "3000", "KAFKA_SESSION_TIMEOUT": "6000"},
            "KAFKA_REQUEST_TIMEOUT",
        ),
        (
            {"KAFKA_SASL_MECHANISM": "FOO", "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"},
            "KAFKA_SASL_MECHANISM",
        ),
        ({"KAFKA_ENABLED": "true", "KAFKA_BROKERS": ""}, "KAFKA_BROKERS"),
        ({"KAFKA_ENABLED": "true", "KAFKA_BROKERS": " , "}, "KAFKA_BROKERS"),
        ({"KAFKA_BROKERS": "kafka-1"}, "KAFKA_BROKERS"),
        ({"KAFKA_BROKERS": "kafka-1:9092,kafka-2"}, "KAFKA_BROKERS"),
        ({"KAFKA_BROKERS": "kafka-1:99999"}, "KAFKA_BROKERS"),
        ({"KAFKA_SASL_USERNAME": "u"}, "KAFKA_SASL_PASSWORD"),
        ({"DATABASE_URL": "mysql://u@db/app"}, "DATABASE_URL"),
        ({"DATABASE_URL": "holdwall.db"}, "DATABASE_URL"),
        ({"OUTBOX_RETENTION": "soon"}, "OUTBOX_RETENTION"),
        ({"KAFKA_ENABLED": "maybe"}, "KAFKA_ENABLED"),
        ({"WEB_PORT": "70000"}, "WEB_PORT"),
    ],
)
def test_bad_value_stops_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    message = _error(monkeypatch, **env)
    assert message.startswith(f"{variable}: "), message
    assert len(message) > len(variable) + 10, "the message must say what is accepted"


def test_sasl_mechanism_lists_what_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(
        monkeypatch, KAFKA_SASL_MECHANISM="FOO", KAFKA_SASL_USERNAME="u", KAFKA_SASL_PASSWORD="p"
    )
    assert "PLAIN" in message and "SCRAM-SHA-256" in message and "SCRAM-SHA-512" in message


@pytest.mark.parametrize("mechanism", ["plain", "SCRAM-SHA-256", "scram-sha-512"])
def test_sasl_mechanisms_accepted_in_any_case(
    monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", mechanism)
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "p")
    settings = load_settings()
    assert settings.sasl_enabled
    assert settings.sasl_mechanism == mechanism.upper()


# --- KAFKA_SSL and KAFKA_TLS are aliases ---


@pytest.mark.parametrize(
    ("ssl", "tls", "enabled"),
    [("false", "false", False), ("true", "false", True), ("false", "true", True)],
)
def test_ssl_and_tls_are_aliases(
    monkeypatch: pytest.MonkeyPatch, ssl: str, tls: str, enabled: bool
) -> None:
    monkeypatch.setenv("KAFKA_SSL", ssl)
    monkeypatch.setenv("KAFKA_TLS", tls)
    assert load_settings().tls_enabled is enabled


# --- DATABASE_URL forms users write map to the async drivers ---


@pytest.mark.parametrize(
    ("raw", "driver_url", "dialect"),
    [
        (
            "postgresql://app@db.internal:5432/holdwall",
            "postgresql+psycopg://app@db.internal:5432/holdwall",
            "postgresql",
        ),
        (
            "postgres://app@db.internal/holdwall",
            "postgresql+psycopg://app@db.internal/holdwall",
            "postgresql",
        ),
        (
            "postgresql+psycopg://app@db.internal/holdwall",
            "postgresql+psycopg://app@db.internal/holdwall",
            "postgresql",
        ),
        ("sqlite:///var/lib/holdwall.db", "sqlite+aiosqlite:///var/lib/holdwall.db", "sqlite"),
        ("sqlite:////abs/holdwall.db", "sqlite+aiosqlite:////abs/holdwall.db", "sqlite"),
        ("sqlite:///./holdwall.db", "sqlite+aiosqlite:///./holdwall.db", "sqlite"),
    ],
)
def test_database_url_forms_map_to_async_drivers(
    monkeypatch: pytest.MonkeyPatch, raw: str, driver_url: str, dialect: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", raw)
    settings = load_settings()
    assert settings.async_database_url == driver_url
    assert settings.database_dialect == dialect


def test_overrides_take_precedence_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "sqlite:///env.db")
    settings = load_settings(database_url="postgresql://app@db/holdwall")
    assert settings.database_dialect == "postgresql"


# --- secrets never show ---


def _secret_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "holdwall")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", SASL_SECRET)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{DB_SECRET}@db.internal:5432/holdwall")
    return load_settings()


def test_secrets_not_in_repr_str_or_redacted_url(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _secret_settings(monkeypatch)
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == SASL_SECRET
    assert DB_SECRET in settings.async_database_url, "the engine still gets the password"
    shown = [repr(settings), str(settings), settings.database_url_redacted]
    for text in shown:
        assert SASL_SECRET not in text
        assert DB_SECRET not in text
    assert (
        settings.database_url_redacted == "postgresql+psycopg://app:***@db.internal:5432/holdwall"
    )


@pytest.mark.parametrize(
    "env",
    [
        {"KAFKA_PARTITIONS": "abc"},
        {"DATABASE_URL": f"mysql://app:{DB_SECRET}@db/holdwall"},
        {"DATABASE_URL": f"postgresql://app:{DB_SECRET}@db:notaport/holdwall"},
        {"DATABASE_URL": f"postgresql://app:{DB_SECRET}@[::1/holdwall"},
        {"KAFKA_SASL_MECHANISM": "FOO"},
        {"KAFKA_SASL_USERNAME": "", "KAFKA_SASL_MECHANISM": "PLAIN"},
    ],
)
def test_secrets_not_in_errors(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "holdwall")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", SASL_SECRET)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{DB_SECRET}@db.internal/holdwall")
    message = _error(monkeypatch, **env)
    assert SASL_SECRET not in message
    assert DB_SECRET not in message


# --- entry points: exit code 2 and one line on stderr ---


def _run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not _is_setting(name)}
    env["KAFKA_PARTITIONS"] = "abc"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("holdwall-stream")
    return [str(script)] if script.exists() else [sys.executable, "-m", "holdwall_stream.cli"]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            [sys.executable, "-m", "faust", "-A", "holdwall_stream", "worker"], id="worker"
        ),
        pytest.param([*_cli(), "verify"], id="verify"),
    ],
)
def test_entry_points_exit_2_with_one_line(command: list[str], tmp_path: Path) -> None:
    result = _run(command, tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "KAFKA_PARTITIONS" in lines[0]
    assert "'abc'" in lines[0]
    assert not list(tmp_path.iterdir()), "nothing may be created before the settings are valid"
