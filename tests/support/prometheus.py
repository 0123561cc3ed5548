"""Debian's Prometheus server and promtool, for tests of deploy/prometheus.

Both come with Debian's ``prometheus`` package, which .ci/run installs. Without it these
tests fail (they do not skip) with a message saying so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from holdwall_stream.embedded import die_with_parent, free_port, stop_process_group
from tests.support.processes import REPO_ROOT, wait_until_async

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
JOB = "holdwall-stream"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install Debian's prometheus package "
            "(apt-get install prometheus; .ci/run does)"
        )
    return path


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        cwd=PROMETHEUS_DIR,
        timeout=120,
    )


class PrometheusServer:
    """A Prometheus scraping ``targets`` every second and evaluating deploy's alert rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": "/api/metrics",
                    "static_configs": [{"targets": targets}],
                }
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(json.dumps(config))  # JSON is YAML
        self.command = [
            tool("prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            stop_process_group(self._process, 10.0)

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a Prometheus HTTP API answer."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def value(self, query: str) -> float | None:
        """The single value of an instant ``query``, or None while it has none."""
        result = self.api("query", query=query)["result"]
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{query} has {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now."""
        return list(self.api("alerts")["alerts"])

    async def wait_for(self, query: str, minimum: float, timeout: float = 60.0) -> float:
        """Waits until ``query`` has a value of at least ``minimum``, and returns it."""
        seen: list[float] = []

        def reached() -> bool:
            value = self._safe_value(query)
            if value is None or value < minimum:
                return False
            seen.append(value)
            return True

        await wait_until_async(reached, timeout=timeout, message=f"{query} >= {minimum}")
        return seen[-1]

    def _safe_value(self, query: str) -> float | None:
        try:
            return self.value(query)
        except OSError:  # not listening yet
            return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
