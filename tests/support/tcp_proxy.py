"""A TCP proxy in a background thread that a test can cut and restore, as a network would.

Tansu keeps its data in memory only, so a broker outage cannot be simulated by stopping the
broker. Instead the broker is started advertising the proxy's port, every client talks to
it through the proxy, and :meth:`TcpProxy.cut` drops all connections and refuses new ones
(the listening socket is closed, so connects get ECONNREFUSED) until :meth:`restore`.
:meth:`TcpProxy.silence` is the quieter failure: the open connections stay open but carry
nothing any more (as across a network partition, where no reset ever arrives), while new
connections work. :meth:`TcpProxy.hang` silences new connections too: a server that
accepts and never answers (overloaded, or a load balancer whose backend is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

from holdwall_stream.embedded import free_port

_CHUNK = 256 * 1024
_CALL_TIMEOUT_S = 10.0


class TcpProxy:
    """Forwards ``listen_host:listen_port`` to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int | None = None,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port if listen_port is not None else free_port(listen_host)
        self.connections_accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[_Link] = set()
        self._hanging = False

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def is_cut(self) -> bool:
        return self._server is None

    # --- control, from any thread ------------------------------------------------------

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(
            target=run, name=f"tcp-proxy-{self.listen_port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_CALL_TIMEOUT_S):
            raise RuntimeError("proxy thread did not start")
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Closes every open connection and stops listening: new connects are refused."""
        self._call(self._cut())

    def restore(self) -> None:
        """Listens again on the same port; clients reconnect as they would after an outage."""
        self._call(self._listen())

    def silence(self) -> None:
        """From now on the connections open now drop whatever is sent either way."""
        for link in list(self._open):
            link.silenced = True

    def hang(self) -> None:
        """Silences the open connections and every one accepted from now on."""
        self._hanging = True
        self.silence()

    def recover(self) -> None:
        """After :meth:`hang`: new connections carry data again, the silenced ones stay
        silent (as after a failover, which the old connections do not survive)."""
        self._hanging = False

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CALL_TIMEOUT_S)
        self._thread = None
        self._loop = None

    def _call(self, coroutine: object) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        future.result(_CALL_TIMEOUT_S)

    # --- inside the proxy's loop -------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.listen_port, reuse_address=True
        )

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if self._server is None:
            _abort(client_writer)
            return
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), 5.0
            )
        except (OSError, TimeoutError):
            _abort(client_writer)
            return
        self.connections_accepted += 1
        self._writers.update((client_writer, upstream_writer))
        link = _Link()
        link.silenced = self._hanging
        self._open.add(link)
        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer, link)),
            asyncio.create_task(self._pump(upstream_reader, client_writer, link)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._open.discard(link)
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_writer, upstream_writer):
                self._writers.discard(writer)
                _abort(writer)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                if link.silenced:
                    continue
                writer.write(data)
                await writer.drain()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _Link:
    """One proxied connection; ``silenced`` once :meth:`TcpProxy.silence` or
    :meth:`TcpProxy.hang` was called."""

    def __init__(self) -> None:
        self.silenced = False


def _abort(writer: asyncio.StreamWriter) -> None:
    """Resets the connection at once (no graceful FIN), as a dropped link looks to a peer."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
