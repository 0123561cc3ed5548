"""TLS in front of Tansu: a self-signed certificate (openssl CLI) and a stunnel4 proxy.

Tansu's own TLS flags failed when tried here, so TLS tests terminate TLS in stunnel and
start Tansu advertising the stunnel port; every client connection then goes through TLS.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from holdwall_stream.embedded import die_with_parent, free_port, stop_process_group

STUNNEL_START_TIMEOUT_S = 10.0


class TlsSetupError(RuntimeError):
    """openssl or stunnel is missing or did not start; the message says how to fix it."""


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


def make_self_signed_certificate(directory: Path, name: str = "server") -> Certificate:
    """A P-256 certificate for CN=localhost with SANs localhost and 127.0.0.1 (its own CA)."""
    if shutil.which("openssl") is None:
        raise TlsSetupError("the openssl CLI is missing (apt-get install -y openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    certificate = Certificate(directory / f"{name}.crt", directory / f"{name}.key")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "2",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(certificate.key), "-out", str(certificate.cert),
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate


def _stunnel_binary() -> str:
    for name in ("stunnel4", "stunnel"):
        path = shutil.which(name)
        if path:
            return path
    raise TlsSetupError("stunnel is missing: apt-get install -y stunnel4")


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class StunnelProxy:
    """TLS on 127.0.0.1:``accept_port``, forwarded in plaintext to 127.0.0.1:``target_port``."""

    def __init__(
        self,
        target_port: int,
        certificate: Certificate,
        workdir: Path,
        accept_port: int | None = None,
    ) -> None:
        self.target_port = target_port
        self.accept_port = accept_port if accept_port is not None else free_port()
        self.certificate = certificate
        self.workdir = workdir
        self.log_path = workdir / "stunnel.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., StunnelProxy] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.accept_port}"

    def start(self) -> StunnelProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "stunnel.conf"
        config.write_text(
            "foreground = yes\n"
            "pid =\n"
            "debug = notice\n"
            "[kafka]\n"
            f"accept = 127.0.0.1:{self.accept_port}\n"
            f"connect = 127.0.0.1:{self.target_port}\n"
            f"cert = {self.certificate.cert}\n"
            f"key = {self.certificate.key}\n"
        )
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [_stunnel_binary(), str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._finalizer = weakref.finalize(self, stop_process_group, self._process, 5.0)
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + STUNNEL_START_TIMEOUT_S
        while not _accepts_connections(self.accept_port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise TlsSetupError(f"stunnel did not start; its log:\n{self._log()}")
            time.sleep(0.02)

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> StunnelProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
