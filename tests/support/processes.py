"""Harness for end-to-end tests: real worker processes, polling helpers, leftover checks.

Each worker gets its own process group, working directory, data directory, web port and
log file, so several can run side by side and a crash test can SIGKILL one cleanly.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar, cast

from holdwall_stream.embedded import (
    die_with_parent,
    free_port,
    signal_group,
    stop_process_group,
    worker_command,
)

T = TypeVar("T")

WORKER_STOP_GRACE_S = 30.0
# Workers import this checkout, whatever their working directory and the installed copy.
REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerDiedError(RuntimeError):
    """The worker exited while a test was waiting for it; the message has its log tail."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Polls ``predicate`` until it returns something truthy, and returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout:.1f} s (last: {value!r})")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 30.0,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Like :func:`wait_until`, without blocking the loop; ``predicate`` may be async."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout:.1f} s (last: {value!r})")
        await asyncio.sleep(interval)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def _status_matches(status: int | None, expected: Collection[int] | None) -> bool:
    if status is None:
        return False
    return expected is None or status in expected


def wait_for_http(
    url: str,
    timeout: float = 30.0,
    interval: float = 0.2,
    status: Collection[int] | None = None,
) -> int:
    """Waits until ``url`` answers (any status, or one of ``status``); returns the status."""
    last: list[int | None] = [None]

    def answered() -> bool:
        last[0] = http_status(url)
        return _status_matches(last[0], status)

    wait_until(answered, timeout, interval, message=f"HTTP answer from {url}")
    assert last[0] is not None
    return last[0]


async def wait_for_http_async(
    url: str,
    timeout: float = 30.0,
    interval: float = 0.2,
    status: Collection[int] | None = None,
) -> int:
    """:func:`wait_for_http` for async tests (the request runs in a thread)."""
    last: list[int | None] = [None]

    async def answered() -> bool:
        last[0] = await asyncio.to_thread(http_status, url)
        return _status_matches(last[0], status)

    await wait_until_async(answered, timeout, interval, message=f"HTTP answer from {url}")
    assert last[0] is not None
    return last[0]


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment has ``name=value`` (inherited by children).

    Tests tag the processes they start with a unique variable and use this to prove that
    nothing is left behind, whatever process group or parent a leftover ended up in.
    """
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


class WorkerProcess:
    """``faust -A holdwall_stream worker`` in its own process group, logging to a file.

    ``env`` is merged over ``os.environ``. The data directory and web port come from the
    arguments, else from ``env`` (FAUST_DATA_DIR, WEB_PORT), else ``workdir/data`` and a
    free port. PYTHONPATH starts with the repository root, so the worker runs this
    checkout's code whatever its working directory.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        workdir: Path,
        *,
        data_dir: Path | None = None,
        web_port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.data_dir = data_dir or Path(env.get("FAUST_DATA_DIR") or workdir / "data")
        self.web_port = web_port or int(env.get("WEB_PORT") or free_port())
        self.log_path = log_path or workdir / "worker.log"
        self.command = worker_command(list(extra_args))
        self.env = {
            **os.environ,
            **env,
            "FAUST_DATA_DIR": str(self.data_dir),
            "WEB_PORT": str(self.web_port),
            "PYTHONUNBUFFERED": "1",
        }
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH")) if p
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., WorkerProcess] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> WorkerProcess:
        if self.is_running():
            raise RuntimeError(f"worker already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._finalizer = weakref.finalize(
            self, stop_process_group, self._process, WORKER_STOP_GRACE_S
        )
        return self

    def send_signal(self, sig: signal.Signals) -> None:
        """Signals the whole process group (e.g. SIGINT, as Ctrl-C would)."""
        if self._process is not None:
            signal_group(self._process, sig)

    def wait(self, timeout: float) -> int:
        """Waits for the worker to exit; raises subprocess.TimeoutExpired if it does not."""
        if self._process is None:
            raise RuntimeError("worker was never started")
        return self._process.wait(timeout=timeout)

    def stop(self, grace_s: float = WORKER_STOP_GRACE_S) -> int | None:
        """SIGTERM to the group, SIGKILL after ``grace_s``; returns the exit code."""
        if self._process is None:
            return None
        stop_process_group(self._process, grace_s)
        if self._finalizer is not None:
            self._finalizer.detach()
        return self._process.returncode

    def kill(self) -> int | None:
        """SIGKILL to the whole group, as a crash (or the OOM killer) would."""
        if self._process is None:
            return None
        signal_group(self._process, signal.SIGKILL)
        self._process.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
        return self._process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _check_alive(self) -> None:
        if not self.is_running():
            raise WorkerDiedError(
                f"worker exited with code {self.returncode}; log tail:\n{self.log_tail()}"
            )

    def _logged(self, text: str) -> bool:
        if text in self.log_text():
            return True
        self._check_alive()
        return False

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Waits until ``text`` appears in the log; fails early if the worker dies."""
        wait_until(lambda: self._logged(text), timeout, 0.1, f"{text!r} in {self.log_path}")

    async def wait_for_log_async(self, text: str, timeout: float = 60.0) -> None:
        """:meth:`wait_for_log` for async tests."""
        await wait_until_async(
            lambda: self._logged(text), timeout, 0.1, f"{text!r} in {self.log_path}"
        )

    def _answers(self, url: str, status: Collection[int] | None, last: list[int | None]) -> bool:
        last[0] = http_status(url)
        if _status_matches(last[0], status):
            return True
        self._check_alive()
        return False

    def wait_for_http(
        self,
        path: str = "/api/health",
        timeout: float = 60.0,
        status: Collection[int] | None = None,
    ) -> int:
        """Waits until the worker's web server answers ``path``; fails early if it dies."""
        url = f"{self.base_url}{path}"
        last: list[int | None] = [None]
        wait_until(lambda: self._answers(url, status, last), timeout, 0.2, f"answer from {url}")
        assert last[0] is not None
        return last[0]

    async def wait_for_http_async(
        self,
        path: str = "/api/health",
        timeout: float = 60.0,
        status: Collection[int] | None = None,
    ) -> int:
        """:meth:`wait_for_http` for async tests (the request runs in a thread)."""
        url = f"{self.base_url}{path}"
        last: list[int | None] = [None]
        await wait_until_async(
            lambda: asyncio.to_thread(self._answers, url, status, last),
            timeout,
            0.2,
            f"answer from {url}",
        )
        assert last[0] is not None
        return last[0]

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"WorkerProcess(pid={self.pid}, web_port={self.web_port}, {state})"
