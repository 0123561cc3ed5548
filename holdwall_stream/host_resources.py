"""What a worker must have to itself on its host: its web port and its data directory.

Faust finds out about either deep in its start-up, and ended in a traceback of mode's
machinery: a second worker on the host with the same WEB_PORT failed to bind; one with
the same FAUST_DATA_DIR crashed on RocksDB's lock of a table once it joined the group.
Both are asked here first, so the worker stops with one line naming the setting.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from holdwall_stream.errors import SettingsError
from holdwall_stream.settings import Settings

DATA_DIR_LOCK = "worker.lock"


def ensure_web_port_free(settings: Settings) -> None:
    """Raises SettingsError naming WEB_PORT if another process listens on it.

    Binds as aiohttp will (SO_REUSEADDR, so a port in TIME_WAIT still counts as free) and
    lets go at once; a process taking the port in between still fails Faust's bind.
    """
    host, port = settings.web_host, settings.web_port
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise SettingsError(
                f"WEB_PORT: {port} is taken on {host} by another process; give each worker "
                "on a host its own WEB_PORT (and FAUST_DATA_DIR)"
            ) from None


def claim_data_dir(settings: Settings) -> int:
    """Creates FAUST_DATA_DIR and locks it for this process; returns the lock's descriptor,
    to keep open for the process's life (the kernel lets go when it ends, kill -9 too).

    Raises SettingsError naming FAUST_DATA_DIR if another live process holds it.
    """
    data_dir: Path = settings.faust_data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(data_dir / DATA_DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SettingsError(
            f"FAUST_DATA_DIR: cannot use {data_dir}: {exc.strerror}; point it at a directory "
            "this user can write"
        ) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise SettingsError(
            f"FAUST_DATA_DIR: {data_dir} is in use by another worker (pid {holder}); give "
            "each worker on a host its own FAUST_DATA_DIR (and WEB_PORT)"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    return descriptor
