"""The verify checks against real brokers: the session's Tansu, one behind stunnel (TLS)
and one requiring SASL authentication. Every failure mode is produced for real."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from holdwall_stream.embedded import EmbeddedBroker, free_port
from holdwall_stream.messaging.client import kafka_client_options
from holdwall_stream.settings import Settings, load_settings
from holdwall_stream.verify import (
    CHECK_NAMES,
    CheckResult,
    VerificationFailed,
    format_results,
    run_checks,
    validate_or_raise,
)
from tests.support.tls import Certificate, StunnelProxy, make_self_signed_certificate

CONNECTION_ERROR = re.compile(r"kafka.*connection.*error", re.IGNORECASE)


@dataclass(frozen=True)
class TlsBroker:
    bootstrap: str
    certificate: Certificate
    other_ca: Certificate


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """Tansu advertising a stunnel port, so every client connection is TLS."""
    workdir = tmp_path_factory.mktemp("tls")
    certificate = make_self_signed_certificate(workdir / "certs")
    other_ca = make_self_signed_certificate(workdir / "certs", name="other")
    tls_port = free_port()
    with (
        EmbeddedBroker(advertised_port=tls_port, log_path=workdir / "tansu.log") as broker,
        StunnelProxy(broker.port, certificate, workdir, accept_port=tls_port) as proxy,
    ):
        yield TlsBroker(proxy.bootstrap, certificate, other_ca)


@pytest.fixture(scope="module")
def sasl_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tansu with --authentication and no users (memory storage cannot hold any)."""
    workdir = tmp_path_factory.mktemp("sasl")
    with EmbeddedBroker(log_path=workdir / "tansu.log", authentication=True) as broker:
        yield broker.bootstrap


def _settings(bootstrap: str, **overrides: object) -> Settings:
    """Unique topics and group per test, so tests never see each other's topics."""
    suffix = uuid.uuid4().hex[:10]
    values: dict[str, object] = {
        "kafka_brokers": bootstrap,
        "kafka_events_topic": f"verify-events-{suffix}",
        "kafka_dlq_topic": f"verify-dlq-{suffix}",
        "kafka_group_id": f"verify-group-{suffix}",
        "kafka_partitions": 3,
        "kafka_connection_timeout": 2000,
        "kafka_request_timeout": 5000,
        "kafka_session_timeout": 5000,  # not above the request timeout (Faust's rule)
    }
    values.update(overrides)
    return load_settings(**values)


async def _create_topics(settings: Settings, partitions: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, n, 1) for name, n in partitions.items()])
    finally:
        await admin.close()


async def _service_topics(settings: Settings, partitions: int | None = None) -> None:
    count = partitions or settings.kafka_partitions
    await _create_topics(
        settings, {settings.kafka_events_topic: count, settings.kafka_dlq_topic: count}
    )


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    assert [r.name for r in results] == list(CHECK_NAMES)
    return {r.name: r for r in results}


async def test_all_checks_pass_against_the_broker(kafka_bootstrap: str) -> None:
    settings = _settings(kafka_bootstrap)
    await _service_topics(settings)

    results = await validate_or_raise(settings)

    checks = _by_name(results)
    assert all(r.ok for r in results), format_results(results)
    assert checks["tls"].detail == "skipped: TLS off"
    assert checks["sasl"].detail == "skipped: SASL off"
    assert "1 broker(s)" in checks["metadata"].detail
    assert f"{settings.kafka_events_topic} (3 partitions)" in checks["topics"].detail
    human = format_results(results)
    assert len(human.splitlines()) == len(CHECK_NAMES)
    assert all(line.startswith("✓ ") for line in human.splitlines())
    document = json.loads(format_results(results, as_json=True))
    assert document["ok"] is True
    assert [c["name"] for c in document["checks"]] == list(CHECK_NAMES)
    assert set(document["checks"][0]) == {"name", "ok", "detail", "duration_ms"}


async def test_roundtrip_uses_its_own_one_partition_topic(kafka_bootstrap: str) -> None:
    settings = _settings(kafka_bootstrap)
    await _service_topics(settings)

    for _ in range(2):  # the second run finds the topic in place
        results = await run_checks(settings)
        assert _by_name(results)["roundtrip"].ok, format_results(results)

    client = AIOKafkaClient(bootstrap_servers=kafka_bootstrap)
    await client.bootstrap()
    try:
        cluster = await client.fetch_all_metadata()
    finally:
        await client.close()
    assert cluster.partitions_for_topic(f"{settings.kafka_group_id}-verify") == {0}
    assert cluster.partitions_for_topic(settings.kafka_dlq_topic) == {0, 1, 2}


async def test_unknown_host_reports_enotfound_and_skips_the_rest() -> None:
    settings = _settings("no-such-host.invalid:9092")

    results = await run_checks(settings)

    checks = _by_name(results)
    assert not checks["dns"].ok
    assert "ENOTFOUND" in checks["dns"].detail
    assert "getaddrinfo" in checks["dns"].detail
    assert "no-such-host.invalid" in checks["dns"].detail
    assert CONNECTION_ERROR.search(checks["dns"].detail)
    for name in CHECK_NAMES[1:]:
        assert checks[name] == CheckResult(name, False, "skipped: dns failed", 0.0)
    with pytest.raises(VerificationFailed, match="ENOTFOUND") as raised:
        await validate_or_raise(settings)
    assert "\n" not in str(raised.value)


async def test_closed_port_fails_tcp() -> None:
    port = free_port()
    settings = _settings(f"127.0.0.1:{port}")

    checks = _by_name(await run_checks(settings))

    assert checks["dns"].ok
    assert not checks["tcp"].ok
    assert f"ECONNREFUSED 127.0.0.1:{port}" in checks["tcp"].detail
    assert CONNECTION_ERROR.search(checks["tcp"].detail)
    assert checks["metadata"].detail == "skipped: tcp failed"


async def test_partition_mismatch_fails_topics_with_advice(kafka_bootstrap: str) -> None:
    settings = _settings(kafka_bootstrap)
    await _create_topics(settings, {settings.kafka_events_topic: 2})

    checks = _by_name(await run_checks(settings))

    topics = checks["topics"]
    assert not topics.ok
    assert f"{settings.kafka_events_topic} has 2 partitions but KAFKA_PARTITIONS=3" in topics.detail
    assert "set KAFKA_PARTITIONS=2" in topics.detail
    assert f"{settings.kafka_dlq_topic} does not exist" in topics.detail
    assert checks["roundtrip"].ok, "the round trip does not depend on the service topics"


async def test_verify_does_not_create_the_service_topics(kafka_bootstrap: str) -> None:
    # Tansu auto-creates a topic (4 partitions) when a client asks for its metadata.
    settings = _settings(kafka_bootstrap)

    first = _by_name(await run_checks(settings))
    second = _by_name(await run_checks(settings))

    assert "does not exist" in first["topics"].detail
    assert "does not exist" in second["topics"].detail


async def test_sasl_failure_is_reported_without_the_password(sasl_bootstrap: str) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    for mechanism in ("PLAIN", "SCRAM-SHA-256"):
        settings = _settings(
            sasl_bootstrap,
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username="alice",
            kafka_sasl_password=password,
        )

        results = await run_checks(settings)

        sasl = _by_name(results)["sasl"]
        assert not sasl.ok
        assert f"SASL {mechanism} authentication as 'alice'" in sasl.detail
        assert CONNECTION_ERROR.search(sasl.detail)
        with pytest.raises(VerificationFailed) as raised:
            await validate_or_raise(settings)
        for text in (
            format_results(results),
            format_results(results, as_json=True),
            repr(results),
            str(raised.value),
            repr(settings),
        ):
            assert password not in text


async def test_sasl_against_a_broker_without_sasl(kafka_bootstrap: str) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    settings = _settings(kafka_bootstrap, kafka_sasl_username="bob", kafka_sasl_password=password)

    results = await run_checks(settings)

    sasl = _by_name(results)["sasl"]
    assert "UNSUPPORTED_SASL_MECHANISM" in sasl.detail
    assert password not in format_results(results) + format_results(results, as_json=True)


async def test_tls_checks_and_roundtrip_through_stunnel(tls_broker: TlsBroker) -> None:
    settings = _settings(
        tls_broker.bootstrap, kafka_ssl=True, kafka_ssl_ca_file=tls_broker.certificate.cert
    )
    await _service_topics(settings)

    results = await run_checks(settings)

    checks = _by_name(results)
    assert all(r.ok for r in results), format_results(results)
    assert re.search(r"TLSv1\.[23] .+, certificate CN=localhost", checks["tls"].detail)
    assert tls_broker.bootstrap in checks["metadata"].detail


async def test_tls_with_the_wrong_ca_fails_clearly(tls_broker: TlsBroker) -> None:
    settings = _settings(
        tls_broker.bootstrap, kafka_tls=True, kafka_ssl_ca_file=tls_broker.other_ca.cert
    )

    checks = _by_name(await run_checks(settings))

    tls = checks["tls"]
    assert not tls.ok
    assert "certificate verify failed" in tls.detail
    assert "KAFKA_SSL_CA_FILE" in tls.detail
    assert CONNECTION_ERROR.search(tls.detail)
    assert checks["roundtrip"].detail == "skipped: tls failed"


async def test_tls_with_a_missing_ca_file_names_the_variable(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    missing = tmp_path / "missing-ca.pem"
    settings = _settings(tls_broker.bootstrap, kafka_ssl=True, kafka_ssl_ca_file=missing)

    tls = _by_name(await run_checks(settings))["tls"]

    assert not tls.ok
    assert f"KAFKA_SSL_CA_FILE: cannot load {missing}" in tls.detail


async def test_tls_against_a_plaintext_listener(kafka_bootstrap: str) -> None:
    settings = _settings(kafka_bootstrap, kafka_ssl=True, kafka_connection_timeout=300)

    tls = _by_name(await run_checks(settings))["tls"]

    assert not tls.ok
    assert "does the broker listen with TLS on this port?" in tls.detail


async def test_an_empty_broker_list_fails_first() -> None:
    checks = _by_name(await run_checks(_settings(" ")))

    assert checks["dns"].detail.startswith("KAFKA_BROKERS lists no brokers")
    assert checks["roundtrip"].detail == "skipped: dns failed"


async def test_client_options_fit_every_aiokafka_client(tls_broker: TlsBroker) -> None:
    settings = _settings(
        tls_broker.bootstrap,
        kafka_ssl=True,
        kafka_ssl_ca_file=tls_broker.certificate.cert,
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="carol",
        kafka_sasl_password="not-logged",
    )

    options = kafka_client_options(settings)

    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["ssl_context"].check_hostname is True
    # Construction validates every keyword; nothing connects before start().
    client = AIOKafkaClient(**options)
    producer = AIOKafkaProducer(**options)
    consumer = AIOKafkaConsumer(**options)
    admin = AIOKafkaAdminClient(**options)
    await client.close()
    await producer.stop()
    await consumer.stop()
    await admin.close()
