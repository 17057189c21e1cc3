"""A gRPC server over the native transport that runs the same servicers as grpcio's.

``NativeServer`` takes what the generated ``add_*Servicer_to_server`` functions, grpcio's
health servicer and reflection register (``add_generic_rpc_handlers``,
``add_registered_method_handlers``) and the same server interceptors, and runs each call
the C++ transport (transport.cc) hands over through them, as ``grpc.aio`` runs it: the
method's handler is found (interceptors first), the request deserialized, the handler run
as a task with a ``NativeContext`` (the subset of ``grpc.aio.ServicerContext`` the
servicers use), and its answer serialized and sent with its status. So every status code,
message and trailing metadata comes from the same Python code for both transports.

Each call's task knows whether other calls are in progress (taken and not answered: a
group that arrived while the event loop was busy), serving/contract.py's
``OTHERS_IN_PROGRESS``, so the data plane batches them rather than run each alone.

Unary calls arrive with their message; a streaming call's next message is read only when
its handler asks for it, and a handler writing faster than its client reads waits
(``WRITE_WINDOW`` messages queued in C++). A call the client cancels, or whose deadline
passes, has its handler task cancelled, as ``grpc.aio`` does.

Thread safety: everything here runs on the event loop's thread; the transport's threads
only queue events and wake the loop through a file descriptor (``loop.add_reader``).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from onnxserve.serving.contract import OTHERS_IN_PROGRESS
from onnxserve.serving.frontends.native import BUILD_PROBLEM, transport

log = logging.getLogger(__name__)

#: grpc.aio's answer to a method no servicer offers
METHOD_NOT_FOUND = "Method not found!"
#: messages of a client stream read ahead of its handler (each read is a round trip
#: through the transport's event queue; the handler's own window, e.g. ModelStreamInfer's
#: STREAM_WINDOW, still bounds what it holds)
READ_AHEAD = 4

Metadata = tuple[tuple[str, str | bytes], ...]
#: the compiled module (None when not built: NativeServer then refuses to start)
_native: Any = transport
#: set once a transport started in this process: a fork from then on is reported (gRPC
#: C++'s threads do not survive into the child, whose copy of the transport must not be
#: used; onnxserve spawns its workers, see serving/workers.py)
_started = False
FORKED = ("this process is a fork of one whose native gRPC transport had started; gRPC C++ "
          "cannot be used in it (start servers before forking, or spawn processes)")


def _fork_reported() -> None:
    log.error("fork after the native gRPC transport started: the child must not use it")


def _forked_child() -> None:
    global _started
    _started = False
    NativeServer.forked = True


class HandlerCallDetails(NamedTuple):
    """What generic handlers and interceptors see of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: Metadata


class _Abort(grpc.aio.AbortError):
    """Raised by NativeContext.abort; ends the handler with the status it set."""


class NativeContext:
    """The ``grpc.aio.ServicerContext`` of one native call (the methods servicers use)."""

    __slots__ = ("_call", "_code", "_details", "_trailing")

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Metadata = ()) -> None:
        """End the call with ``code`` and ``details`` (raises, as grpc.aio's does)."""
        if code == grpc.StatusCode.OK:
            raise ValueError("abort needs a status code other than OK")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise _Abort()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def invocation_metadata(self) -> Metadata:
        return self._call.metadata

    def time_remaining(self) -> float | None:
        """Seconds until the call's deadline (None: it has none)."""
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def peer(self) -> str:
        return self._call.peer

    def cancelled(self) -> bool:
        return self._call.cancelled

    def done(self) -> bool:
        return self._call.finished or self._call.cancelled

    async def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        """Initial metadata is not sent by the native transport (no servicer sends any)."""

    async def write(self, message: Any) -> None:
        """Send one message of a server-streaming answer (waits while the client lags)."""
        await self._call.write(message)

    async def read(self) -> Any:
        """The next request message of a client-streaming call (grpc.aio.EOF at the end)."""
        message = await self._call.read()
        return grpc.aio.EOF if message is None else message


class _Call:
    """One call's state on the event loop's side."""

    __slots__ = (
        "cancelled",
        "deadline",
        "finished",
        "half_closed",
        "handler",
        "id",
        "messages",
        "metadata",
        "method",
        "peer",
        "reading",
        "server",
        "streaming",
        "task",
        "waiter",
        "writable",
    )

    def __init__(self, server: NativeServer, call_id: int, method: str, metadata: Metadata,
                 deadline: float | None, peer: str) -> None:
        self.id = call_id
        self.server = server
        self.method = method
        self.metadata = metadata
        #: time.monotonic() at the call's deadline (None: none), as gRPC C++ counts it
        self.deadline = deadline
        self.peer = peer
        self.handler: grpc.RpcMethodHandler | None = None
        self.task: asyncio.Task | None = None
        self.cancelled = False
        self.finished = False
        #: messages received and not yet read by the handler (None: the client's end)
        self.messages: collections.deque[bytes | None] = collections.deque()
        self.half_closed = False
        self.reading = False  # a read was asked of the transport
        self.streaming = False  # the handler takes a stream of requests (reads ahead)
        self.waiter: asyncio.Future[None] | None = None  # the handler waits for a message
        self.writable: asyncio.Future[None] | None = None  # the handler waits to write

    # --- the transport's events ----------------------------------------------------------

    def received(self, message: bytes | None) -> None:
        self.reading = False
        if message is None:
            self.half_closed = True
        self.messages.append(message)
        self._wake_reader()
        self.read_ahead()

    def read_ahead(self) -> None:
        """Ask for the stream's next message while fewer than READ_AHEAD wait."""
        if (self.streaming and not self.reading and not self.half_closed
                and not self.cancelled and len(self.messages) < READ_AHEAD):
            self.reading = True
            self.server.transport.read(self.id)

    def ended(self) -> None:
        """The client cancelled, the deadline passed or the server stopped."""
        self.cancelled = True
        self._wake_reader()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        if self.task is not None and not self.finished:
            self.task.cancel()

    def can_write(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def _wake_reader(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # --- the handler's side --------------------------------------------------------------

    async def read(self) -> Any:
        """The next request (deserialized), None after the client's last."""
        assert self.handler is not None
        while not self.messages:
            if self.cancelled:
                raise asyncio.CancelledError()
            if not self.reading and not self.half_closed:
                self.reading = True
                self.server.transport.read(self.id)
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        data = self.messages.popleft()
        if data is None:
            self.messages.appendleft(None)  # the end stays the end
            return None
        self.read_ahead()
        return _deserialize(self.handler, data)

    async def requests(self) -> AsyncIterator[Any]:
        while (request := await self.read()) is not None:
            yield request

    async def write(self, message: Any) -> None:
        assert self.handler is not None
        if self.cancelled:
            raise asyncio.CancelledError()
        data = self.handler.response_serializer(message) if \
            self.handler.response_serializer else message
        if self.server.transport.write(self.id, data):
            self.writable = asyncio.get_running_loop().create_future()
            try:
                await self.writable
            finally:
                self.writable = None


def _deserialize(handler: grpc.RpcMethodHandler, data: bytes) -> Any:
    return handler.request_deserializer(data) if handler.request_deserializer else data


class NativeServer:
    """The ``grpc.aio.Server`` methods server.py uses, over the native transport.

    A process forked after a transport started logs an error, and its child refuses to
    build or start one (RuntimeError naming why).

    ``interceptors`` are ``grpc.aio.ServerInterceptor`` objects, run for every call in
    order; ``options`` are grpcio's channel arguments (names and values as grpcio takes
    them), passed to gRPC C++ unchanged.

    Raises:
        RuntimeError: the native transport is not built, or this process is such a child
            (naming why).
    """

    #: this process was forked from one whose transport had started
    forked = False

    def __init__(self, interceptors: Sequence[Any] = (),
                 options: Iterable[tuple[str, int | str]] = ()) -> None:
        if transport is None:
            raise RuntimeError(f"the native gRPC transport is not built: {BUILD_PROBLEM}")
        if NativeServer.forked:
            raise RuntimeError(FORKED)
        self.transport = _native.Transport()
        self._interceptors = tuple(interceptors)
        #: the lookup through every interceptor, chained once (not per call)
        self._intercepted: Callable[[HandlerCallDetails], Any] = self._lookup_async
        for interceptor in reversed(self._interceptors):
            self._intercepted = _chain(interceptor, self._intercepted)
        self._options = [(name, value) for name, value in options]
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._calls: dict[int, _Call] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0

    # --- registration (what add_*Servicer_to_server call) --------------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
            self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for method, handler in method_handlers.items():
            self._methods[f"/{service_name}/{method}"] = handler

    # --- ports and lifecycle -------------------------------------------------------------

    def add_port(self, address: str, *, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_client_ca: Path | None = None) -> int:
        """Listen on ``address`` (``host:port``), with TLS when ``tls_cert`` and ``tls_key``
        are given (and mutual TLS with ``tls_client_ca``); returns the port bound, 0 when
        it cannot be bound. Calls are taken from then on and answered once ``start`` ran.
        One port per server."""
        if self._port:
            raise RuntimeError("the native transport listens on one port")
        certificate = key = roots = ""
        if tls_cert is not None and tls_key is not None:
            certificate, key = tls_cert.read_text(), tls_key.read_text()
            roots = tls_client_ca.read_text() if tls_client_ca is not None else ""
        global _started
        if NativeServer.forked:
            raise RuntimeError(FORKED)
        if not _started:
            _started = True
            os.register_at_fork(before=_fork_reported, after_in_child=_forked_child)
        self._port = self.transport.start(address, self._options, private_key=key,
                                          certificate=certificate, root_certificates=roots,
                                          require_client_certificate=bool(roots))
        return self._port

    async def start(self) -> None:
        """Answer calls: from now on the event loop takes the transport's events."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.transport.fd(), self._take)
        self._take()  # the calls that came before

    async def stop(self, grace: float | None) -> None:
        """Stop taking calls, wait up to ``grace`` s for the calls in progress (the event
        loop goes on answering them), then cancel the rest."""
        await asyncio.to_thread(self.transport.stop, grace or 0.0)
        if self._loop is not None:
            self._loop.remove_reader(self.transport.fd())
        for call in list(self._calls.values()):
            call.ended()

    # --- calls ---------------------------------------------------------------------------

    def _take(self) -> None:
        calls = self._calls
        for call_id, kind, payload in self.transport.take():
            if kind == _native.START:
                self._begin(call_id, *payload)
                continue
            call = calls.get(call_id)
            if call is None:
                continue
            if kind == _native.MESSAGE:
                call.received(payload)
            elif kind == _native.HALF_CLOSE:
                call.received(None)
            elif kind == _native.WRITABLE:
                call.can_write()
            elif kind == _native.CANCELLED:
                call.ended()

    def _begin(self, call_id: int, method: str, metadata: list, deadline: float | None,
               peer: str, message: bytes | None) -> None:
        call = _Call(self, call_id, method, tuple(metadata), deadline, peer)
        if message is None:
            call.half_closed = True
            call.messages.append(None)
        else:
            call.messages.append(message)
        self._calls[call_id] = call
        call.task = asyncio.get_running_loop().create_task(self._run(call))

    def _lookup(self, details: HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The handler registered for the call's method (None: no servicer offers it)."""
        handler = self._methods.get(details.method)
        if handler is None:
            for generic in self._generic:
                handler = generic.service(details)
                if handler is not None:
                    break
        return handler

    async def _handler(self, call: _Call) -> grpc.RpcMethodHandler | None:
        """The call's handler, through the interceptors (each may answer instead)."""
        details = HandlerCallDetails(call.method, call.metadata)
        if not self._interceptors:
            return self._lookup(details)
        return await self._intercepted(details)

    async def _lookup_async(self, details: HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._lookup(details)

    async def _run(self, call: _Call) -> None:
        OTHERS_IN_PROGRESS.set(len(self._calls) > 1)
        context = NativeContext(call)
        answer: bytes | None = None
        try:
            # the usual call: a registered method, no interceptor (no coroutine to await)
            handler = None if self._interceptors else self._methods.get(call.method)
            if handler is None:
                handler = await self._handler(call)
            call.handler = handler
            if handler is None:
                context.set_code(grpc.StatusCode.UNIMPLEMENTED)
                context.set_details(METHOD_NOT_FOUND)
            elif not handler.request_streaming:
                request = await call.read()
                if request is None:
                    raise _Protocol("the call carries no request message")
                if handler.response_streaming:
                    await _stream_out(handler.unary_stream(request, context), call)
                else:
                    answer = _serialize(handler, await handler.unary_unary(request, context))
            elif handler.response_streaming:
                call.streaming = True
                await _stream_out(handler.stream_stream(call.requests(), context), call)
            else:
                call.streaming = True
                answer = _serialize(handler, await handler.stream_unary(call.requests(),
                                                                        context))
        except _Abort:
            answer = None
        except asyncio.CancelledError:
            if not call.cancelled:  # the server's own cancellation: answer, then stop
                self._finish(call, context, grpc.StatusCode.CANCELLED, "cancelled", None)
                raise
            answer = None
        except _Protocol as exc:
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(str(exc))
        except Exception as exc:
            log.error("%s failed unexpectedly", call.method, exc_info=exc)
            context.set_code(grpc.StatusCode.UNKNOWN)
            context.set_details(f"Unexpected {type(exc).__name__}: {exc}")
        self._finish(call, context, None, None, answer)

    def _finish(self, call: _Call, context: NativeContext, code: grpc.StatusCode | None,
                details: str | None, answer: bytes | None) -> None:
        if call.finished:
            return
        call.finished = True
        self._calls.pop(call.id, None)
        code = code or context.code() or grpc.StatusCode.OK
        trailing = [(key, value if isinstance(value, str) else value.decode("latin-1"))
                    for key, value in context.trailing_metadata()]
        # the only call in progress: nothing else waits for the event loop, so it starts
        # the send itself rather than wake the transport's sender thread
        self.transport.finish(call.id, code.value[0], details or context.details(),
                              trailing, answer if code == grpc.StatusCode.OK else None,
                              now=not self._calls)


class _Protocol(Exception):
    """A call that breaks its method's shape (a unary call without its message)."""


def _chain(interceptor: Any, continuation: Callable[[HandlerCallDetails], Any]
           ) -> Callable[[HandlerCallDetails], Any]:
    async def intercepted(details: HandlerCallDetails) -> Any:
        return await interceptor.intercept_service(continuation, details)
    return intercepted


def _serialize(handler: grpc.RpcMethodHandler, response: Any) -> bytes:
    return handler.response_serializer(response) if handler.response_serializer else response


async def _stream_out(produced: Any, call: _Call) -> None:
    """Send what a streaming handler produces: an async generator's items, or nothing more
    when the handler wrote with ``context.write`` (a coroutine)."""
    if inspect.isasyncgen(produced):
        async for message in produced:
            await call.write(message)
    elif inspect.isawaitable(produced):
        await produced
    else:  # a plain iterator
        for message in produced:
            await call.write(message)
