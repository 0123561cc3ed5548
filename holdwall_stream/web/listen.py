"""Whether the worker's web port is free, asked before Faust binds it.

Faust binds WEB_PORT deep in its start-up: a port taken by another process (a second
worker on the host with the same WEB_PORT) ended in a traceback of mode's machinery.
"""

from __future__ import annotations

import errno
import socket

from holdwall_stream.errors import SettingsError
from holdwall_stream.settings import Settings


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
