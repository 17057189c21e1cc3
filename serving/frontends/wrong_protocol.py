"""Clients that speak another protocol to the HTTP/REST port get one answer that says so.

Two mistakes are common enough to answer instead of failing obscurely:

- **gRPC (HTTP/2) to the HTTP port** (``classify.py --url host:8000``, a gRPC health probe
  on the wrong port): aiohttp takes the HTTP/2 connection preface for a broken HTTP/1.1
  request, logs a traceback at ERROR, and answers 400, which the gRPC client reports as
  "Failed parsing HTTP/2 ... Trying to connect an http1.x server". Here the connection
  gets a minimal HTTP/2 exchange instead (RFC 9113: the server's SETTINGS, an acknowledgement
  of the client's, and for each call a trailers-only answer, as gRPC over HTTP/2 specifies
  them) with status UNIMPLEMENTED and a message naming the gRPC port, then GOAWAY. The
  client shows that message; the server logs one line.
- **TLS to a plaintext HTTP port** (``https://`` URL, a client with --ssl): the ClientHello
  is answered with a plain 400 naming the problem (the client reports a TLS "wrong version
  number", as for any server that does not speak TLS), and one line is logged.

A wrapper protocol looks at the first bytes of each connection and hands everything else to
aiohttp's own protocol untouched. What cannot be answered this way: plaintext HTTP to the
TLS port (Python's TLS layer ends the handshake before any byte reaches the application;
the client sees the connection closed), and HTTP/1.1 to the gRPC port (gRPC's C core
answers with its HTTP/2 SETTINGS frame and closes: curl says "Received HTTP/0.9 when not
allowed"), as with Triton.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

log = logging.getLogger(__name__)

#: RFC 9113, section 3.4: what an HTTP/2 client with prior knowledge sends first
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: the first byte of a TLS handshake record (RFC 8446, section 5.1: content type 22)
TLS_HANDSHAKE = 0x16
#: bytes of HTTP/2 frames read before giving up on finding a call to answer
MAX_HTTP2_BYTES = 64 * 1024
#: seconds a refused connection is kept half-closed, reading, so that closing it does not
#: reset it (and discard the answer) while the client still sends
LINGER_S = 2.0

_DATA, _HEADERS, _SETTINGS, _GOAWAY = 0x0, 0x1, 0x4, 0x7
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
#: gRPC status UNIMPLEMENTED: this port does not implement gRPC (not retried by clients)
GRPC_UNIMPLEMENTED = 12


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame (RFC 9113, section 4.1)."""
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + stream.to_bytes(4, "big") + payload)


def _hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541, section 5.1) whose first byte carries ``first``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    data = text.encode("ascii")
    return _hpack_integer(len(data), 7) + data


def grpc_refusal_headers(message: str) -> bytes:
    """The HPACK block of a gRPC trailers-only answer with status UNIMPLEMENTED.

    ``:status 200`` (static table entry 8), ``content-type: application/grpc`` (literal,
    the name from static entry 31), ``grpc-status`` and ``grpc-message`` (literals, not
    indexed: nothing is added to the client's dynamic table). grpc-message is
    percent-encoded as gRPC's HTTP/2 protocol document says (space to ``~`` but ``%``
    unencoded).
    """
    encoded = "".join(c if " " <= c <= "~" and c != "%" else
                      "".join(f"%{b:02X}" for b in c.encode()) for c in message)
    return (b"\x88" + _hpack_integer(31, 4) + _hpack_string("application/grpc")
            + b"\x00" + _hpack_string("grpc-status") + _hpack_string(str(GRPC_UNIMPLEMENTED))
            + b"\x00" + _hpack_string("grpc-message") + _hpack_string(encoded))


class FirstBytes(asyncio.Protocol):
    """One connection of the HTTP port: its first bytes decide whether ``inner`` (aiohttp's
    protocol for the connection, given every call) serves it or it is answered here.

    ``grpc_port``: the port to name to gRPC clients; ``plaintext``: the port does not serve
    TLS (a TLS ClientHello is then a mistake); ``http_port``: this port, for the messages.
    """

    def __init__(self, inner: asyncio.Protocol, *, http_port: int, grpc_port: int | None,
                 plaintext: bool) -> None:
        self._inner = inner
        self._http_port = http_port
        self._grpc_port = grpc_port
        self._plaintext = plaintext
        self._transport: asyncio.Transport | None = None
        self._head = b""
        #: "sniff" (deciding), "pass" (aiohttp's), "http2" (answered here), "done"
        self._mode = "sniff"
        self._frames = bytearray()
        self._linger: asyncio.TimerHandle | None = None

    # --- the protocol calls, passed on to aiohttp's protocol ----------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def eof_received(self) -> bool | None:
        if self._mode in ("http2", "done"):
            self._close()
            return None
        return self._inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._mode == "pass":
            self._inner.data_received(data)
        elif self._mode == "http2":
            self._http2(data)
        elif self._mode == "sniff":
            self._sniff(data)
        # "done": the answer is out; what the client still sends is read and dropped

    # --- deciding ------------------------------------------------------------------------

    def _sniff(self, data: bytes) -> None:
        head = self._head + data
        if not head:
            return
        if self._plaintext and head[0] == TLS_HANDSHAKE:
            self._refuse_tls()
            return
        if len(head) < len(HTTP2_PREFACE) and HTTP2_PREFACE.startswith(head):
            self._head = head  # so far a prefix of the preface: wait for the rest
            return
        self._head = b""
        if head.startswith(HTTP2_PREFACE):
            self._mode = "http2"
            self._write(_frame(_SETTINGS, 0, 0))  # the server's connection preface
            self._http2(head[len(HTTP2_PREFACE):])
            return
        self._mode = "pass"
        self._inner.data_received(head)

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client"

    def _refuse_tls(self) -> None:
        message = (f"port {self._http_port} serves plain HTTP, not TLS: use an http:// URL, "
                   "or start the server with --tls-cert and --tls-key")
        log.warning("a TLS client (%s) connected to the plaintext HTTP port %d; answered "
                    "400: %s", self._peer(), self._http_port, message)
        body = (message + "\n").encode()
        self._write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        self._finish()

    def _grpc_message(self) -> str:
        where = (f"gRPC is on port {self._grpc_port}" if self._grpc_port
                 else "this server's gRPC port is its --grpc-port")
        return (f"port {self._http_port} is onnxserve's HTTP/REST port (KServe V2 REST over "
                f"HTTP/1.1), not gRPC; {where}")

    def _http2(self, data: bytes) -> None:
        """Read the client's frames; answer every call that opened so far, then GOAWAY."""
        self._frames += data
        calls: list[int] = []
        while len(self._frames) >= 9:
            length = int.from_bytes(self._frames[:3], "big")
            if len(self._frames) < 9 + length:
                break
            kind, flags = self._frames[3], self._frames[4]
            stream = int.from_bytes(self._frames[5:9], "big") & 0x7FFFFFFF
            del self._frames[:9 + length]
            if kind == _SETTINGS and not flags & _ACK:
                self._write(_frame(_SETTINGS, _ACK, 0))
            elif kind == _HEADERS and stream % 2 == 1 and stream not in calls:
                calls.append(stream)
        if calls:
            message = self._grpc_message()
            block = grpc_refusal_headers(message)
            for stream in calls:
                self._write(_frame(_HEADERS, _END_STREAM | _END_HEADERS, stream, block))
            # NO_ERROR; later calls (above the last stream) are retried on a new connection
            self._write(_frame(_GOAWAY, 0, 0, max(calls).to_bytes(4, "big")
                               + (0).to_bytes(4, "big") + message.encode()))
            log.warning("a gRPC client (%s) connected to the HTTP/REST port %d; answered "
                        "UNIMPLEMENTED: %s", self._peer(), self._http_port,
                        self._grpc_message().split("; ", 1)[1])
            self._finish()
        elif len(self._frames) > MAX_HTTP2_BYTES:
            self._finish()

    # --- ending ------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _finish(self) -> None:
        """Stop writing, keep reading (and dropping) for up to LINGER_S, then close."""
        self._mode = "done"
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._linger = asyncio.get_running_loop().call_later(LINGER_S, self._close)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
