"""aiokafka connection options from the settings: one place for TLS, SASL and timeouts."""

from __future__ import annotations

import ssl
from typing import Any

from holdwall_stream.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_enabled:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.kafka_ssl_ca_file) if settings.kafka_ssl_ca_file else None
    )
    context.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_cert_file:
        context.load_cert_chain(
            str(settings.kafka_ssl_cert_file),
            str(settings.kafka_ssl_key_file) if settings.kafka_ssl_key_file else None,
        )
    return context


def security_protocol(settings: Settings) -> str:
    if settings.sasl_enabled:
        return "SASL_SSL" if settings.tls_enabled else "SASL_PLAINTEXT"
    return "SSL" if settings.tls_enabled else "PLAINTEXT"


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments shared by every aiokafka producer, consumer and admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": security_protocol(settings),
        "request_timeout_ms": settings.kafka_request_timeout,
        "ssl_context": ssl_context(settings),
    }
    if settings.sasl_enabled:
        assert settings.kafka_sasl_password is not None  # enforced by Settings
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options
