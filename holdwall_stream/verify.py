"""Kafka checks shared by startup validation and `holdwall-stream verify`.

The checks run in the order an operator would debug a connection: name resolution, TCP,
TLS, SASL, cluster metadata, the service's topics, and a produce/consume round trip. A
check whose prerequisite failed is reported as skipped (and failed), naming the cause,
so the first red line is the one to fix. No detail ever contains a secret.

The aiokafka options come from :mod:`holdwall_stream.messaging.client`, as for every
other client of the service, so verify tests exactly what the worker will use.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from typing import Any

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import ClusterMetadata
from aiokafka.conn import create_conn
from aiokafka.errors import (
    BrokerResponseError,
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)

from holdwall_stream.errors import HoldwallError, SettingsError
from holdwall_stream.messaging.client import (
    build_ssl_context,
    kafka_client_options,
)
from holdwall_stream.settings import BrokerAddress, Settings

CHECK_NAMES = ("dns", "tcp", "tls", "sasl", "metadata", "topics", "roundtrip")
# Every check's prerequisites, in check order: the first failed one is named as the cause.
_PREREQUISITES: dict[str, tuple[str, ...]] = {
    "dns": (),
    "tcp": ("dns",),
    "tls": ("dns", "tcp"),
    "sasl": ("dns", "tcp", "tls"),
    "metadata": ("dns", "tcp", "tls", "sasl"),
    "topics": ("dns", "tcp", "tls", "sasl", "metadata"),
    "roundtrip": ("dns", "tcp", "tls", "sasl", "metadata"),
}
ROUNDTRIP_FETCH_MAX_WAIT_MS = 50  # Tansu holds an empty fetch for the whole wait
CONNECTION_ERROR = "Kafka connection error"


class VerificationFailed(HoldwallError):
    """One or more Kafka checks failed; the message lists them (without secrets)."""

    def __init__(self, results: list[CheckResult]) -> None:
        self.results = results
        failed = "; ".join(f"{r.name}: {r.detail}" for r in results if not r.ok)
        super().__init__(f"Kafka verification failed: {failed}")


class _CheckFailed(Exception):
    """Raised inside a check with the detail to report."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    duration_ms: float


# --- helpers ------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "ECONNECT")


def _kafka_error(exc: KafkaError) -> str:
    """The broker's error name and what it said, without aiokafka's connection reprs."""
    if isinstance(exc, BrokerResponseError):
        said = next((a for a in exc.args if isinstance(a, str) and a), exc.description)
        return f"{exc.message}: {said}"
    return str(exc)


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def _close_quietly(closer: Awaitable[object]) -> None:
    # A client that failed to start may fail to close; the check already has its verdict.
    with suppress(KafkaError, OSError):
        await closer


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()


# --- the checks ---------------------------------------------------------------------------


class _Verifier:
    """Runs the checks in order; holds what later checks reuse (cluster metadata)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connect_timeout_s = settings.kafka_connection_timeout / 1000
        self.request_timeout_s = settings.kafka_request_timeout / 1000
        self.cluster: ClusterMetadata | None = None

    async def dns(self) -> str:
        if not self.settings.brokers:
            raise _CheckFailed("KAFKA_BROKERS lists no brokers; expected host:port[,host:port]")
        loop = asyncio.get_running_loop()

        async def resolve(broker: BrokerAddress) -> str:
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(broker.host, broker.port, type=socket.SOCK_STREAM),
                    self.connect_timeout_s,
                )
            except socket.gaierror as exc:
                raise _CheckFailed(
                    f"{CONNECTION_ERROR}: getaddrinfo ENOTFOUND {broker.host} ({exc.strerror})"
                ) from None
            except TimeoutError:
                raise _CheckFailed(
                    f"{CONNECTION_ERROR}: getaddrinfo ENOTFOUND {broker.host} "
                    f"(no answer within {self.settings.kafka_connection_timeout} ms)"
                ) from None
            addresses = dict.fromkeys(str(info[4][0]) for info in infos)
            return f"{broker.host} → {', '.join(addresses)}"

        return "; ".join(await self._each_broker(resolve))

    async def tcp(self) -> str:
        async def connect(broker: BrokerAddress) -> str:
            started = time.perf_counter()
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(broker.host, broker.port), self.connect_timeout_s
                )
            except TimeoutError:
                raise _CheckFailed(
                    f"{CONNECTION_ERROR}: connect ETIMEDOUT {broker} "
                    f"(no answer within {self.settings.kafka_connection_timeout} ms)"
                ) from None
            except OSError as exc:
                raise _CheckFailed(
                    f"{CONNECTION_ERROR}: connect {_errno_name(exc)} {broker} ({_reason(exc)})"
                ) from None
            await _close_writer(writer)
            return f"{broker} connected in {(time.perf_counter() - started) * 1000:.1f} ms"

        return "; ".join(await self._each_broker(connect))

    async def tls(self) -> str:
        if not self.settings.tls_enabled:
            return "skipped: TLS off"
        try:
            context = build_ssl_context(self.settings)
        except SettingsError as exc:
            raise _CheckFailed(f"Kafka TLS configuration error: {exc}") from None
        assert context is not None
        hint = "check KAFKA_SSL_CA_FILE" + (
            " and KAFKA_SSL_CHECK_HOSTNAME" if self.settings.kafka_ssl_check_hostname else ""
        )

        async def handshake(broker: BrokerAddress) -> str:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        broker.host,
                        broker.port,
                        ssl=context,
                        server_hostname=broker.host,
                        ssl_handshake_timeout=self.connect_timeout_s,
                    ),
                    self.connect_timeout_s * 2,
                )
            except ssl.SSLCertVerificationError as exc:
                raise _CheckFailed(
                    f"{CONNECTION_ERROR}: TLS handshake with {broker} failed: "
                    f"{_reason(exc)} ({hint})"
                ) from None
            except (OSError, TimeoutError) as exc:
                # Covers SSLError; a handshake timeout surfaces as ConnectionAbortedError.
                reason = "timed out" if isinstance(exc, TimeoutError) else _reason(exc)
                raise _CheckFailed(
                    f"{CONNECTION_ERROR}: TLS handshake with {broker} failed: {reason} "
                    f"(does the broker listen with TLS on this port?)"
                ) from None
            ssl_object = writer.get_extra_info("ssl_object")
            cipher = ssl_object.cipher()[0] if ssl_object else "?"
            version = ssl_object.version() if ssl_object else "?"
            subject = dict(
                pair
                for rdn in (writer.get_extra_info("peercert") or {}).get("subject", ())
                for pair in rdn
            )
            await _close_writer(writer)
            peer = f", certificate CN={subject['commonName']}" if "commonName" in subject else ""
            return f"{broker} {version} {cipher}{peer}"

        return "; ".join(await self._each_broker(handshake))

    async def sasl(self) -> str:
        if not self.settings.sasl_enabled:
            return "skipped: SASL off"
        options = kafka_client_options(self.settings)
        mechanism = options["sasl_mechanism"]

        async def authenticate(broker: BrokerAddress) -> str:
            try:
                conn = await create_conn(
                    broker.host,
                    broker.port,
                    client_id=options["client_id"],
                    request_timeout_ms=options["request_timeout_ms"],
                    ssl_context=options["ssl_context"],
                    security_protocol=options["security_protocol"],
                    sasl_mechanism=mechanism,
                    sasl_plain_username=options["sasl_plain_username"],
                    sasl_plain_password=options["sasl_plain_password"],
                )
            except KafkaError as exc:
                reason = _kafka_error(exc)
            except (ValueError, KeyError) as exc:
                # aiokafka's SCRAM client raises these when the broker's final message is
                # an error (no signature) or its nonce/signature does not match.
                reason = f"the broker rejected the exchange ({type(exc).__name__}: {exc})"
            else:
                conn.close()
                return f"{broker} authenticated"
            raise _CheckFailed(
                f"{CONNECTION_ERROR}: SASL {mechanism} authentication as "
                f"{self.settings.kafka_sasl_username!r} on {broker} failed: {reason} "
                f"(check KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD)"
            )

        results = await self._each_broker(authenticate)
        return f"{mechanism} as {self.settings.kafka_sasl_username!r}: {'; '.join(results)}"

    async def metadata(self) -> str:
        client = AIOKafkaClient(**kafka_client_options(self.settings))
        try:
            await client.bootstrap()
            cluster = await client.fetch_all_metadata()
        except KafkaConnectionError:
            raise _CheckFailed(
                f"{CONNECTION_ERROR}: no broker of {self.settings.kafka_brokers} answered a "
                f"metadata request (do KAFKA_SSL and KAFKA_SASL_* match the brokers' listener?)"
            ) from None
        finally:
            await _close_quietly(client.close())
        brokers = sorted(cluster.brokers(), key=lambda b: b.nodeId)
        if not brokers:
            raise _CheckFailed("metadata lists no brokers")
        # The addresses brokers advertise are what producers and consumers connect to.
        advertised = [BrokerAddress(b.host, b.port) for b in brokers]
        await self._each(advertised, self._reach_advertised)
        self.cluster = cluster
        controller = cluster.controller.nodeId if cluster.controller else "unknown"
        listed = ", ".join(f"{b.nodeId}@{b.host}:{b.port}" for b in brokers)
        return f"{len(brokers)} broker(s): {listed}; controller {controller}"

    async def _reach_advertised(self, broker: BrokerAddress) -> str:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(broker.host, broker.port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise _CheckFailed(
                f"{CONNECTION_ERROR}: a broker advertises {broker}, which is unreachable from "
                f"here ({_reason(exc) if isinstance(exc, OSError) else 'timed out'}); "
                f"check the brokers' advertised.listeners"
            ) from None
        await _close_writer(writer)
        return str(broker)

    async def topics(self) -> str:
        assert self.cluster is not None
        wanted = self.settings.kafka_partitions
        found, problems = [], []
        for topic in (self.settings.kafka_events_topic, self.settings.kafka_dlq_topic):
            partitions = self.cluster.partitions_for_topic(topic)
            if partitions is None:
                visibility = " or is not visible to this user" if self.settings.sasl_enabled else ""
                problems.append(
                    f"{topic} does not exist{visibility}: start the worker (it creates it with "
                    f"KAFKA_PARTITIONS={wanted} partitions) or create it with {wanted} partitions"
                )
            elif len(partitions) != wanted:
                problems.append(
                    f"{topic} has {len(partitions)} partitions but KAFKA_PARTITIONS={wanted}: "
                    f"set KAFKA_PARTITIONS={len(partitions)}, or recreate the topic with "
                    f"{wanted} partitions"
                )
            else:
                found.append(f"{topic} ({len(partitions)} partitions)")
        if problems:
            raise _CheckFailed("; ".join(problems))
        return ", ".join(found)

    async def roundtrip(self) -> str:
        assert self.cluster is not None
        topic = f"{self.settings.kafka_group_id}-verify"
        options = kafka_client_options(self.settings)
        await self._ensure_verify_topic(topic, options)
        key = f"verify-{uuid.uuid4()}".encode()
        started = time.perf_counter()
        producer = AIOKafkaProducer(**options, acks="all")
        try:
            await producer.start()
            sent = await producer.send_and_wait(topic, b'{"verify": true}', key=key, partition=0)
        finally:
            await _close_quietly(producer.stop())
        consumer = AIOKafkaConsumer(
            **options,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=ROUNDTRIP_FETCH_MAX_WAIT_MS,
        )
        partition = TopicPartition(topic, 0)
        try:
            await consumer.start()
            consumer.assign([partition])
            consumer.seek(partition, sent.offset)
            deadline = time.monotonic() + self.request_timeout_s
            while not await self._received(consumer, partition, key):
                if time.monotonic() > deadline:
                    raise _CheckFailed(
                        f"produced to {topic}[0]@{sent.offset} but did not consume it back "
                        f"within {self.settings.kafka_request_timeout} ms"
                    )
        finally:
            await _close_quietly(consumer.stop())
        elapsed = (time.perf_counter() - started) * 1000
        return f"produced to {topic}[0]@{sent.offset} and consumed it back in {elapsed:.1f} ms"

    @staticmethod
    async def _received(consumer: AIOKafkaConsumer, partition: TopicPartition, key: bytes) -> bool:
        batches = await consumer.getmany(partition, timeout_ms=200)
        return any(record.key == key for record in batches.get(partition, ()))

    async def _ensure_verify_topic(self, topic: str, options: dict[str, Any]) -> None:
        """Creates the 1-partition verify topic before anything asks for its metadata."""
        assert self.cluster is not None
        if self.cluster.partitions_for_topic(topic) is not None:
            return
        replication = min(self.settings.kafka_replication_factor, len(self.cluster.brokers()))
        admin = AIOKafkaAdminClient(**options)
        try:
            await admin.start()
            response = await admin.create_topics([NewTopic(topic, 1, replication)])
        except TopicAlreadyExistsError:
            return
        finally:
            await _close_quietly(admin.close())
        for _, code, message in response.topic_errors:
            error = for_code(code)
            if code and error is not TopicAlreadyExistsError:
                raise _CheckFailed(
                    f"cannot create topic {topic}: {error.__name__}"
                    f"{f' ({message})' if message else ''}"
                )

    async def _each_broker(self, check: Callable[[BrokerAddress], Awaitable[str]]) -> list[str]:
        return await self._each(list(self.settings.brokers), check)

    @staticmethod
    async def _each(
        brokers: list[BrokerAddress], check: Callable[[BrokerAddress], Awaitable[str]]
    ) -> list[str]:
        """Runs ``check`` on all brokers at once; fails with every broker's failure."""
        outcomes = await asyncio.gather(*(check(b) for b in brokers), return_exceptions=True)
        failures = [str(o) for o in outcomes if isinstance(o, _CheckFailed)]
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, _CheckFailed):
                raise outcome
        if failures:
            raise _CheckFailed("; ".join(failures))
        return [o for o in outcomes if isinstance(o, str)]

    def budget_s(self, name: str) -> float:
        """Upper bound of one check, so a silent broker cannot hang verification."""
        if name in ("dns", "tcp", "tls"):
            return self.connect_timeout_s * 2 + 1
        return self.connect_timeout_s + self.request_timeout_s * 2 + 1


async def run_checks(settings: Settings) -> list[CheckResult]:
    """Runs every check in order; never raises for a Kafka problem, it reports it."""
    verifier = _Verifier(settings)
    secret = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
    results: list[CheckResult] = []
    failed: set[str] = set()
    for name in CHECK_NAMES:
        cause = next((p for p in _PREREQUISITES[name] if p in failed), None)
        if cause is not None:
            failed.add(name)
            results.append(CheckResult(name, False, f"skipped: {cause} failed", 0.0))
            continue
        started = time.perf_counter()
        ok, detail = await _run_one(name, getattr(verifier, name), verifier.budget_s(name))
        detail = _one_line(detail)
        if secret:
            detail = detail.replace(secret, "***")
        if not ok:
            failed.add(name)
        results.append(CheckResult(name, ok, detail, (time.perf_counter() - started) * 1000))
    return results


async def _run_one(
    name: str, check: Callable[[], Awaitable[str]], budget_s: float
) -> tuple[bool, str]:
    try:
        return True, await asyncio.wait_for(check(), budget_s)
    except _CheckFailed as exc:
        return False, str(exc)
    except TimeoutError:
        return False, f"{CONNECTION_ERROR}: {name} check timed out after {budget_s * 1000:.0f} ms"
    except KafkaError as exc:
        return False, f"{CONNECTION_ERROR}: {_kafka_error(exc)}"
    except (OSError, ssl.SSLError) as exc:
        return False, f"{CONNECTION_ERROR}: {type(exc).__name__}: {_reason(exc)}"
    except SettingsError as exc:
        return False, str(exc)
    except Exception as exc:
        # A diagnostic tool must report, not crash: any other client bug is one more finding.
        return False, f"{name} check failed unexpectedly: {type(exc).__name__}: {exc}"


def format_results(results: list[CheckResult], as_json: bool = False) -> str:
    """Human: one line per check with ✓/✗; JSON: {"ok": bool, "checks": [...]}."""
    if as_json:
        checks = [{**asdict(r), "duration_ms": round(r.duration_ms, 1)} for r in results]
        return json.dumps(
            {"ok": all(r.ok for r in results), "checks": checks}, indent=2, ensure_ascii=False
        )
    width = max((len(r.name) for r in results), default=0)
    return "\n".join(
        f"{'✓' if r.ok else '✗'} {r.name:<{width}}  {r.detail} ({r.duration_ms:.1f} ms)"
        for r in results
    )


async def validate_or_raise(settings: Settings) -> list[CheckResult]:
    """KAFKA_VALIDATE_ON_STARTUP: returns the results, or raises VerificationFailed."""
    results = await run_checks(settings)
    if not all(r.ok for r in results):
        raise VerificationFailed(results)
    return results
