"""aiokafka connection options from the settings: one place for TLS, SASL and timeouts.

Every producer, consumer and admin client of the service (and the verify checks) is
built from :func:`kafka_client_options`, so verify tests what the worker will use.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from holdwall_stream.errors import SettingsError
from holdwall_stream.settings import Settings

CONNECTIONS_MAX_IDLE_MS = 540_000  # below the brokers' default connections.max.idle.ms
RETRY_BACKOFF_MS = 100
METADATA_MAX_AGE_MS = 300_000


def security_protocol(settings: Settings) -> str:
    if settings.sasl_enabled:
        return "SASL_SSL" if settings.tls_enabled else "SASL_PLAINTEXT"
    return "SSL" if settings.tls_enabled else "PLAINTEXT"


def build_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context from KAFKA_SSL_* files; None when TLS is off.

    With KAFKA_SSL_CA_FILE only that CA is trusted (as with Kafka's truststore);
    without it, the system's CAs. Unreadable files raise SettingsError naming the variable.
    """
    if not settings.tls_enabled:
        return None
    ca_file = settings.kafka_ssl_ca_file
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"KAFKA_SSL_CA_FILE: cannot load {ca_file}: {_reason(exc)}") from None
    context.check_hostname = settings.kafka_ssl_check_hostname
    cert_file, key_file = settings.kafka_ssl_cert_file, settings.kafka_ssl_key_file
    if key_file and not cert_file:
        raise SettingsError("KAFKA_SSL_KEY_FILE: set KAFKA_SSL_CERT_FILE as well")
    if cert_file:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE: cannot load {cert_file}"
                f"{f' and {key_file}' if key_file else ''}: {_reason(exc)}"
            ) from None
    return context


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments accepted by AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient
    and AIOKafkaClient alike: addresses, security, timeouts.

    aiokafka bounds connection set-up by ``request_timeout_ms``; KAFKA_CONNECTION_TIMEOUT
    is enforced by the verify checks. The dict holds the SASL password: never log it.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.kafka_group_id,
        "security_protocol": security_protocol(settings),
        "ssl_context": build_ssl_context(settings),
        "request_timeout_ms": settings.kafka_request_timeout,
        "connections_max_idle_ms": CONNECTIONS_MAX_IDLE_MS,
        "retry_backoff_ms": RETRY_BACKOFF_MS,
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
    }
    if settings.sasl_enabled:
        password = settings.kafka_sasl_password
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__
