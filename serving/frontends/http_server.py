"""The HTTP/REST server's lifecycle, in the phases serving/server.py runs: bind the port,
serve on the running event loop (the gRPC server's), drain, stop.

Binding comes first and apart from serving, so that a port in use stops the start before
anything is served. Only the workers of one ``--workers N`` supervisor bind with
SO_REUSEPORT, as they bind the gRPC port, to share it (the kernel spreads connections
across them); any other server's socket on the port makes the bind fail, so that a second
server never silently takes half the connections of the first. TLS uses the gRPC server's
certificate, key and client CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from aiohttp import web

from onnxserve.serving.frontends.http_service import HttpService
from onnxserve.serving.frontends.wrong_protocol import FirstBytes

#: seconds ``stop`` waits for answers being written before it closes their connections
STOP_TIMEOUT_S = 1.0
#: pending connections the listening socket holds (Triton's HTTP server uses 1024 too)
BACKLOG = 1024


def bind(host: str, port: int, *, share: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port); ``share``: with
    SO_REUSEPORT, for the workers of one ``--workers N`` supervisor only.

    Raises:
        OSError: the address cannot be bound (taken, or not this machine's).
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG,
                                reuse_port=share)


class HttpServer:
    """One HttpService served on a bound socket."""

    def __init__(self, service: HttpService, sock: socket.socket,
                 ssl_context: ssl.SSLContext | None = None, *,
                 grpc_port: int | None = None) -> None:
        """``grpc_port``: the port named to a gRPC client that connects here by mistake."""
        self.service = service
        self._sock = sock
        self._ssl = ssl_context
        self._grpc_port = grpc_port
        self._listener: asyncio.AbstractServer | None = None
        # handler_cancellation: a client that closes its connection cancels its handler
        # (aiohttp's default lets it run on), so its inference request leaves the queue
        # uncomputed, as a cancelled gRPC call's does (the data plane finishes repository
        # changes whoever waits for them).
        self._runner = web.AppRunner(service.application(), handle_signals=False,
                                     access_log=None, shutdown_timeout=STOP_TIMEOUT_S,
                                     handler_cancellation=True)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    async def start(self) -> None:
        """Start answering on the socket (call on the event loop that serves gRPC).

        aiohttp's low-level server makes each connection's protocol (as a site would);
        each is wrapped in wrong_protocol.FirstBytes, which answers a gRPC or TLS client
        that came to this port by mistake and passes everything else on.
        """
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        port, grpc_port, plaintext = self.port, self._grpc_port, self._ssl is None
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: FirstBytes(server(), http_port=port, grpc_port=grpc_port,
                               plaintext=plaintext),
            sock=self._sock, ssl=self._ssl, backlog=BACKLOG)

    def drain(self) -> None:
        """From now on every answer closes its connection (``Connection: close``); requests
        are still read and answered, on new connections and on the keep-alive connections
        open now (the data plane refuses inference with UNAVAILABLE, answered 503).

        An idle keep-alive connection is not closed here: HTTP/1.1 has no way to tell a
        client that the server closes it, so a request the client sends while the close is
        on its way is never answered, and clients do not retry a POST on a closed
        connection (RFC 9112, section 9.3.1; tritonclient raises HTTPConnectionClosed).
        Answering that request and closing after the answer moves the client away as
        surely; the connections still idle then are closed by ``stop``, at the end of the
        drain, as gRPC's are (serving/server.py)."""
        self.service.closing = True

    async def stop(self) -> None:
        """Stop listening and close every connection (answers being written get up to
        STOP_TIMEOUT_S); before ``start``, only close the socket."""
        self.service.closing = True
        if self._listener is not None:
            self._listener.close()  # stop listening; cleanup closes the connections
        if self._runner.server is not None:  # started
            await self._runner.cleanup()
        with contextlib.suppress(OSError):
            self._sock.close()
