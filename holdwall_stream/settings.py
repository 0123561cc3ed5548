"""Every setting of the service, read once from the environment and passed down.

A bad value raises :class:`SettingsError` whose message is one line naming the variable
and what it accepts; entry points print it and exit. Secrets (SASL password, the
database password) are ``SecretStr`` and never appear in reprs or error messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from holdwall_stream.errors import SettingsError

SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SECRET_FIELDS = {"kafka_sasl_password", "database_url"}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

PositiveMs = Annotated[int, Field(gt=0)]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_duration_seconds(raw: str | int | float) -> float:
    """Accepts plain seconds or a number with ms/s/m/h/d, e.g. ``7d``."""
    if isinstance(raw, int | float):
        if raw < 0:
            raise ValueError("must not be negative")
        return float(raw)
    match = _DURATION.match(raw)
    if not match:
        raise ValueError("expected a duration such as 3600, 90s, 15m, 12h or 7d")
    return int(match.group(1)) * _DURATION_SECONDS[match.group(2)]


def parse_brokers(raw: str) -> tuple[BrokerAddress, ...]:
    addresses = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        part = part.removeprefix("kafka://")
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port entries separated by commas")
        addresses.append(BrokerAddress(host.strip("[]"), int(port)))
    return tuple(addresses)


def async_database_url(url: str) -> str:
    """Maps the URLs users write to the async drivers the worker uses."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("expected postgresql://user:pw@host:5432/db or sqlite:///path")
    scheme = scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg_async"):
        mapped = f"postgresql+psycopg://{rest}"
    elif scheme in ("sqlite", "sqlite+aiosqlite"):
        mapped = f"sqlite+aiosqlite://{rest}"
    else:
        raise ValueError(
            f"unsupported scheme {scheme!r}; use postgresql://user:pw@host:5432/db or sqlite:///path"
        )
    try:
        make_url(mapped)
    except (ValueError, ArgumentError):
        # The parser's own message may quote parts of the URL (and so the password).
        raise ValueError(
            "cannot be parsed; expected postgresql://user:pw@host:5432/db or sqlite:///path"
        ) from None
    return mapped


class Settings(BaseSettings):
    """The deployment checklist's variables (names and defaults exact) plus this project's."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- Kafka (deployment checklist) ---
    kafka_enabled: bool = False
    kafka_brokers: Annotated[str, NoDecode] = "localhost:9092"
    kafka_connection_timeout: PositiveMs = 10_000
    kafka_request_timeout: PositiveMs = 30_000
    kafka_ssl: bool = False
    kafka_tls: bool = False
    kafka_ssl_ca_file: Path | None = None
    kafka_ssl_cert_file: Path | None = None
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_events_topic: str = Field("holdwall-events", min_length=1, max_length=249)
    kafka_dlq_topic: str = Field("holdwall-dlq", min_length=1, max_length=249)
    kafka_group_id: str = Field("holdwall-stream", min_length=1)
    kafka_partitions: int = Field(3, ge=1, le=10_000)
    kafka_replication_factor: int = Field(1, ge=1, le=32)
    kafka_validate_on_startup: bool = False
    kafka_session_timeout: PositiveMs = 10_000
    kafka_max_message_bytes: int = Field(1_000_000, ge=1024)

    # --- this project ---
    database_url: SecretStr = SecretStr("sqlite:///./holdwall.db")
    database_timeout_ms: int = Field(10_000, ge=1000, le=600_000)
    web_host: str = "0.0.0.0"
    web_port: int = Field(3000, ge=1, le=65535)
    faust_data_dir: Path = Path("./holdwall-data")
    rocksdb_block_cache_mb: int = Field(8, ge=1, le=4096)

    outbox_poll_interval_ms: PositiveMs = 500
    outbox_batch_size: int = Field(1000, ge=1, le=100_000)
    outbox_retention: Annotated[float, NoDecode] = 7 * 86400.0
    outbox_retention_batch: int = Field(5000, ge=1)
    outbox_retry_backoff_ms: PositiveMs = 100
    outbox_retry_backoff_max_ms: PositiveMs = 30_000
    outbox_stuck_after_s: int = Field(300, ge=1)

    breaker_failure_threshold: int = Field(5, ge=1)
    breaker_reset_timeout_ms: PositiveMs = 30_000

    pipeline_max_attempts: int = Field(3, ge=1, le=100)
    pipeline_retry_backoff_ms: PositiveMs = 200
    pipeline_handler_timeout_ms: int = Field(30_000, ge=1, le=3_600_000)
    pipeline_handlers: str = ""
    pipeline_unknown_type: Literal["skip", "dlq"] = "skip"
    lag_refresh_interval_ms: PositiveMs = 5000

    api_max_batch: int = Field(1000, ge=1, le=100_000)
    api_max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)

    @field_validator("kafka_brokers")
    @classmethod
    def _check_brokers(cls, value: str) -> str:
        parse_brokers(value)
        return value

    @field_validator("kafka_sasl_mechanism", mode="before")
    @classmethod
    def _check_mechanism(cls, value: str | None) -> str | None:
        if value is None or not str(value).strip():
            return None
        normalised = str(value).strip().upper()
        if normalised not in SASL_MECHANISMS:
            raise ValueError(f"expected one of {', '.join(SASL_MECHANISMS)}")
        return normalised

    @field_validator("kafka_sasl_username", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value if value is None or str(value).strip() else None

    @field_validator("kafka_sasl_password", mode="before")
    @classmethod
    def _blank_password_is_unset(cls, value: object) -> object:
        return None if value is None or value == "" else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        async_database_url(value.get_secret_value())
        return value

    @field_validator("outbox_retention", mode="before")
    @classmethod
    def _parse_retention(cls, value: str | float) -> float:
        return parse_duration_seconds(value)

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.kafka_enabled and not self.brokers:
            raise _combination_error("kafka_brokers", "must list at least one host:port")
        if self.kafka_sasl_username and self.kafka_sasl_password is None:
            raise _combination_error(
                "kafka_sasl_password", "must be set when KAFKA_SASL_USERNAME is set"
            )
        if self.kafka_sasl_mechanism and not self.kafka_sasl_username:
            raise _combination_error(
                "kafka_sasl_username", "must be set when KAFKA_SASL_MECHANISM is set"
            )
        if self.kafka_events_topic == self.kafka_dlq_topic:
            raise _combination_error("kafka_dlq_topic", "must differ from KAFKA_EVENTS_TOPIC")
        if self.kafka_request_timeout < self.kafka_session_timeout:
            # Faust refuses to start otherwise, with a traceback.
            raise _combination_error(
                "kafka_request_timeout",
                f"must be >= KAFKA_SESSION_TIMEOUT ({self.kafka_session_timeout} ms)",
            )
        if self.outbox_retry_backoff_max_ms < self.outbox_retry_backoff_ms:
            raise _combination_error(
                "outbox_retry_backoff_max_ms", "must be >= OUTBOX_RETRY_BACKOFF_MS"
            )
        return self

    # --- derived views, so callers never re-parse ---
    @property
    def brokers(self) -> tuple[BrokerAddress, ...]:
        return parse_brokers(self.kafka_brokers)

    @property
    def bootstrap_servers(self) -> list[str]:
        return [str(b) for b in self.brokers]

    @property
    def tls_enabled(self) -> bool:
        return self.kafka_ssl or self.kafka_tls

    @property
    def sasl_enabled(self) -> bool:
        return self.kafka_sasl_username is not None

    @property
    def sasl_mechanism(self) -> str:
        return self.kafka_sasl_mechanism or "PLAIN"

    @property
    def async_database_url(self) -> str:
        return async_database_url(self.database_url.get_secret_value())

    @property
    def database_dialect(self) -> Literal["postgresql", "sqlite"]:
        return "sqlite" if self.async_database_url.startswith("sqlite") else "postgresql"

    @property
    def database_stall_limit_s(self) -> float | None:
        """How long the worker waits on PostgreSQL for a unit of work (a request's insert,
        a batch of dead letters, a pipeline batch's own statements; the relay adds
        KAFKA_REQUEST_TIMEOUT) before giving it up as stalled; None on SQLite, a local file
        that cannot go silent."""
        if self.database_dialect != "postgresql":
            return None
        return self.database_timeout_ms / 1000

    @property
    def database_url_redacted(self) -> str:
        return make_url(self.async_database_url).render_as_string(hide_password=True)


class _CombinationError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _combination_error(field: str, message: str) -> _CombinationError:
    return _CombinationError(field, message)


def load_settings(**overrides: object) -> Settings:
    """Reads the environment; raises SettingsError with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except _CombinationError as exc:
        raise SettingsError(f"{exc.field.upper()}: {exc}") from None


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = error.get("loc") or ("settings",)
    field = str(location[0])
    if isinstance(error.get("ctx", {}).get("error"), _CombinationError):
        combination = error["ctx"]["error"]
        return f"{combination.field.upper()}: {combination}"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if field in _SECRET_FIELDS:
        return f"{field.upper()}: {message}"
    return f"{field.upper()}: {message} (got {error.get('input')!r})"
