"""The embedded broker and `make run`'s supervisor leave no process behind, whatever
happens to the Python process that started them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from holdwall_stream.embedded import (
    BrokerPortInUseError,
    EmbeddedBroker,
    EmbeddedBrokerError,
    free_port,
    run_local,
)
from tests.support.processes import REPO_ROOT, processes_with_env, wait_for_http, wait_until

MARKER = "HOLDWALL_TEST_MARKER"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_start_answers_and_stop_leaves_nothing(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    broker.start()
    pid = broker.pid
    assert pid is not None and broker.is_running()
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert _accepts(broker.port)
    assert "listening on" in (tmp_path / "tansu.log").read_text()

    broker.stop()
    broker.stop()  # idempotent

    assert not broker.is_running()
    assert not _alive(pid)
    assert not _accepts(broker.port)


def test_kill_then_restart_on_the_same_port() -> None:
    with EmbeddedBroker() as broker:
        first_pid = broker.pid
        broker.kill()
        assert first_pid is not None and not _alive(first_pid)
        assert not _accepts(broker.port)

        broker.start()

        assert broker.is_running() and broker.pid != first_pid
        assert _accepts(broker.port)
    assert not broker.is_running()


def test_a_taken_port_fails_without_spawning(occupied_port: int) -> None:
    broker = EmbeddedBroker(port=occupied_port)

    with pytest.raises(BrokerPortInUseError, match=f"port {occupied_port} .* already in use"):
        broker.start()

    assert broker.pid is None


def test_an_address_it_cannot_listen_on_is_named() -> None:
    with pytest.raises(EmbeddedBrokerError, match=r"cannot listen on 192\.0\.2\.1"):
        EmbeddedBroker(host="192.0.2.1", port=free_port()).start()


@pytest.mark.parametrize("ending", ["sigint", "sigterm", "exit-without-stop"])
def test_the_broker_dies_with_its_python_process(ending: str) -> None:
    marker = uuid.uuid4().hex
    script = textwrap.dedent(
        """
        import sys, time
        from holdwall_stream.embedded import EmbeddedBroker
        broker = EmbeddedBroker()
        broker.start()
        print(broker.port, flush=True)
        if sys.argv[1] != "exit-without-stop":
            time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, ending],
        env={**os.environ, MARKER: marker},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert parent.stdout is not None
    try:
        port = int(parent.stdout.readline())
        if ending == "sigint":
            os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C reaches the foreground group
        elif ending == "sigterm":
            parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=15)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
        parent.stdout.close()

    wait_until(lambda: not processes_with_env(MARKER, marker), timeout=5, message="no leftover")
    # An exiting process stops showing its environment (its memory is released) a moment
    # before its sockets are closed: the port must close as that exit completes.
    wait_until(lambda: not _accepts(port), timeout=5, message="the broker's port closed")


def test_run_local_refuses_a_taken_port_in_one_line(
    occupied_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KAFKA_BROKERS", raising=False)

    returncode = run_local(["--broker-port", str(occupied_port)])

    assert returncode == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"port {occupied_port} is already in use" in error
    assert "KAFKA_BROKERS" in error


def _run_local_env(tmp_path: Path, marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    env.update(
        {
            MARKER: marker,
            "PYTHONPATH": str(REPO_ROOT),
            "DATABASE_URL": f"sqlite:///{tmp_path}/holdwall.db",
            "WEB_PORT": str(free_port()),
            "FAUST_DATA_DIR": str(tmp_path / "data"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.mark.e2e
def test_run_local_ctrl_c_stops_worker_and_broker(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    env = _run_local_env(tmp_path, marker)
    broker_port = free_port()
    log = tmp_path / "run.log"
    with log.open("wb") as output:
        run = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from holdwall_stream.embedded import run_local; "
                "sys.exit(run_local(sys.argv[1:]))",
                "--broker-port",
                str(broker_port),
            ],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{env['WEB_PORT']}/api/health", timeout=60)
        assert _accepts(broker_port)

        os.killpg(run.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        returncode = run.wait(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()

    assert returncode == 0, log.read_text()
    assert f"embedded broker (Tansu) on 127.0.0.1:{broker_port}" in log.read_text()
    wait_until(lambda: not processes_with_env(MARKER, marker), timeout=5, message="no leftover")
    assert not _accepts(broker_port)


def test_run_local_returns_the_workers_failure_and_stops_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = uuid.uuid4().hex
    env = _run_local_env(tmp_path, marker)
    env["WEB_PORT"] = "not-a-port"
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    broker_port = free_port()

    returncode = run_local(["--broker-port", str(broker_port)])

    assert returncode != 0
    assert not processes_with_env(MARKER, marker)
    assert not _accepts(broker_port)
