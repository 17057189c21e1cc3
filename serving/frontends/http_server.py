"""The HTTP/REST server's lifecycle, in the phases serving/server.py runs: bind the port,
serve on the running event loop (the gRPC server's), drain, stop.

Binding comes first and apart from serving, so that a port in use stops the start before
anything is served. The socket is bound with SO_REUSEPORT, as grpc.aio binds the gRPC
port, so that ``--workers N`` share it (the kernel spreads connections across them). TLS
uses the gRPC server's certificate, key and client CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from aiohttp import web

from onnxserve.serving.frontends.http_service import HttpService

#: seconds ``stop`` waits for answers being written before it closes their connections
STOP_TIMEOUT_S = 1.0
#: pending connections the listening socket holds (Triton's HTTP server uses 1024 too)
BACKLOG = 1024


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port), SO_REUSEPORT set.

    Raises:
        OSError: the address cannot be bound (taken, or not this machine's).
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG,
                                reuse_port=True)


class HttpServer:
    """One HttpService served on a bound socket."""

    def __init__(self, service: HttpService, sock: socket.socket,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.service = service
        self._sock = sock
        self._ssl = ssl_context
        self._runner = web.AppRunner(service.application(), handle_signals=False,
                                     access_log=None, shutdown_timeout=STOP_TIMEOUT_S)
        #: closing the connections open when the drain began
        self._closing: asyncio.Future[None] | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    async def start(self) -> None:
        """Start answering on the socket (call on the event loop that serves gRPC)."""
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock, ssl_context=self._ssl,
                           backlog=BACKLOG).start()

    def drain(self, timeout: float) -> None:
        """From now on every answer closes its connection; the connections open now close
        at once when idle, else after the answer being handled (given up to ``timeout``
        s, then cancelled). New connections are still answered (the data plane refuses
        inference with UNAVAILABLE, answered 503)."""
        self.service.closing = True
        server = self._runner.server
        if server is not None and self._closing is None:
            # as the runner's own cleanup does: stop each connection's wait for its next
            # request, then close each once its answer is out
            server.pre_shutdown()
            self._closing = asyncio.ensure_future(server.shutdown(timeout))

    async def stop(self) -> None:
        """Stop listening and close every connection (answers being written get up to
        STOP_TIMEOUT_S); before ``start``, only close the socket."""
        self.service.closing = True
        if self._closing is not None and not self._closing.done():
            self._closing.cancel()
        if self._runner.server is not None:  # started
            await self._runner.cleanup()
        with contextlib.suppress(OSError):
            self._sock.close()
