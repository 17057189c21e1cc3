"""The KServe V2 HTTP/REST front end (with Triton's extensions): a thin adapter over the
data plane.

Each route turns its request into a data-plane call (serving/dataplane.py) and the result
into JSON; tensors go through http_codec.py. ``HTTP_STATUS`` maps every canonical error
code to an HTTP status in one place (Triton's 400, 404, 503 and 500; the other codes as
google.rpc.Code documents their HTTP equivalents), and every failure is answered as
``{"error": "..."}``. Health answers 200 for true and 400 for false, as Triton does.

Routes (``[/versions/{v}]`` is optional):

    GET  /v2/health/live, /v2/health/ready       GET  /v2
    GET  /v2/models/{m}[/versions/{v}]           GET  /v2/models/{m}[/versions/{v}]/ready
    GET  /v2/models/{m}[/versions/{v}]/config    GET  /v2/models[/{m}[/versions/{v}]]/stats
    POST /v2/models/{m}[/versions/{v}]/infer     POST /v2/repository/index
    POST /v2/repository/models/{m}/load          POST /v2/repository/models/{m}/unload
    GET, POST /v2/logging                        GET, POST /v2[/models/{m}]/trace/setting
    POST /v2/systemsharedmemory/region/{name}/register
    POST /v2/systemsharedmemory[/region/{name}]/unregister
    GET  /v2/systemsharedmemory[/region/{name}]/status
    and the same three under /v2/cudasharedmemory

Logging reads (GET) or changes (POST, a JSON object of Triton's keys) the log settings and
answers them as a JSON object; a register body is ``{"key", "offset", "byte_size"}``
(``offset`` 0 when absent) and a status answer Triton's list of
``{"name", "key", "offset", "byte_size"}``. Tracing and CUDA shared memory are not built:
their routes answer 501 with what to use instead.

A request body larger than the limit (``--max-message-bytes``) is refused with 413
before it is read when its Content-Length says so, and as soon as it passes the limit when
it comes chunked (or compressed: gzip and deflate request bodies are accepted, counted
after decompression; other content codings get 415, a body that is not what its coding says
400). An inference request refused before the data plane runs it (a body that cannot be
read or decoded, JSON that is not an inference request) is counted and logged as the data
plane counts the others (DataPlane.reject). While the server drains, every answer closes
its connection.

The web server is aiohttp's (serving/frontends/http_server.py runs it on the gRPC
server's event loop), chosen by measurement against uvicorn with httptools and with h11
(benchmarks/results/http_library.md): on a LeNet-5-sized infer aiohttp and uvicorn-httptools
are level at c=1 and uvicorn-httptools is 11% ahead at c=16 (22% on an empty POST), a few
percent of a served request; uvicorn-h11 is half as fast. For that, aiohttp gives as public
API what this front end needs: serving on a running event loop without taking over the
stop signals, routing, a body limit that covers chunked and compressed bodies, and a
shutdown that closes idle keep-alive connections while requests in flight finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import http_exceptions, web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from onnxserve.serving.contract import InferResult
from onnxserve.serving.dataplane import DataPlane
from onnxserve.serving.errors import CANCELLED, ServingError, error_code
from onnxserve.serving.frontends.auth import OPEN_HTTP_PATHS, bearer_refusal
from onnxserve.serving.frontends.http_codec import (
    HEADER_LENGTH,
    header_length,
    infer_request,
    infer_response,
    parse_header,
)
from onnxserve.serving.observability import stages
from onnxserve.serving.observability.stages import CLOCK
from onnxserve.serving.observability.statistics import StatisticDuration, VersionStatistics
from onnxserve.serving.shared_memory import cuda_shared_memory_unsupported

log = logging.getLogger(__name__)

#: canonical error code -> HTTP status (an unknown code: 500)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
#: the response header that carries a failed inference request's id
REQUEST_ID_HEADER = "request-id"
#: Triton's name for the binary tensor extension, which only this front end offers
BINARY_TENSOR_EXTENSION = "binary_tensor_data"
#: the fields of a system shared memory register body (Triton's)
REGISTER_FIELDS = ("key", "offset", "byte_size")

_JSON_TYPE = "application/json"
_BINARY_TYPE = "application/octet-stream"
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_INT64_TYPES = frozenset((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                          FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                          FieldDescriptor.TYPE_SFIXED64))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_status(code: str) -> int:
    """The HTTP status of a canonical error code."""
    return HTTP_STATUS.get(code, 500)


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(value).encode(), status=status, content_type=_JSON_TYPE)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def failure(exc: Exception) -> web.Response:
    """The answer to a failed operation: a ServingError's status and message, anything
    else 500 (a bug: the caller logs it)."""
    if isinstance(exc, ServingError):
        return _error(http_status(exc.code), str(exc))
    return _error(http_status(error_code(exc)), f"internal error: {type(exc).__name__}: {exc}")


def front_end_failure(exc: HttpFrontEndError) -> web.Response:
    """The answer to a request the HTTP layer refused: its status and message, with
    ``WWW-Authenticate`` on a 401 (RFC 6750 section 3), and the connection closed after a
    413 (the rest of the body is not read)."""
    response = _error(exc.status, str(exc))
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if exc.status == 413:
        response.force_close()
    return response


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: field names as in the .proto,
    enums by name, 64-bit integers as JSON numbers (protobuf's own JSON mapping writes
    them as strings), fields left at their defaults omitted."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _field_json(value_field, item)
                               for key, item in value.items()}
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_field_json(field, item) for item in value]
        else:
            out[field.name] = _field_json(field, value)
    return out


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name \
            if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", "replace")
    if field.type in _INT64_TYPES:
        return int(value)
    return value


def _duration(duration: StatisticDuration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def statistics_json(stats: VersionStatistics) -> dict[str, Any]:
    """One model version's statistics as Triton's HTTP statistics extension lists them."""
    return {
        "name": stats.name, "version": stats.version, "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": {
            key: _duration(getattr(stats, key))
            for key in ("success", "fail", "queue", "compute_input", "compute_infer",
                        "compute_output")},
        "batch_stats": [
            {"batch_size": batch.batch_size, **{key: _duration(getattr(batch, key))
                                                for key in ("compute_input", "compute_infer",
                                                            "compute_output")}}
            for batch in stats.batches],
    }


class HttpFrontEndError(Exception):
    """A request refused by the HTTP layer itself, with an HTTP status that may be no
    canonical code's (413 for a body over the limit, 415 for a content coding not
    offered, 401 without the token) and the canonical code it is counted under in the
    metrics (``code``; by default the one whose status it is, 413's RESOURCE_EXHAUSTED as
    gRPC's for a message over the limit, any other 4xx INVALID_ARGUMENT)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODE_OF_STATUS.get(
            status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


#: HTTP status -> the canonical code counted for it (the first code HTTP_STATUS maps to it)
_CODE_OF_STATUS = {status: code for code, status in reversed(HTTP_STATUS.items())}
_CODE_OF_STATUS[413] = "RESOURCE_EXHAUSTED"
#: the content codings a request body may have (RFC 9110 section 8.4.1; "x-gzip" is gzip)
CONTENT_CODINGS = ("gzip", "deflate")


def decode_content(body: bytes, content_encoding: str, limit: int) -> bytes:
    """``body`` decoded as its ``Content-Encoding`` header says: a list of the codings
    applied in order (RFC 9110 section 8.4), undone in reverse. ``identity`` is no coding;
    ``deflate`` is zlib data (RFC 9110 section 8.4.1.2), raw deflate data accepted too as
    most servers do. The decoded body may not pass ``limit`` bytes (nor may any step of it:
    a small compressed body cannot fill the memory).

    Raises:
        HttpFrontEndError: 415 for a coding not offered (naming it and those offered), 400
            for a body that is not what its coding says (naming the coding), 413 when the
            decoded body passes ``limit``.
    """
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not body:  # no content: nothing was coded
        return body
    for coding in reversed(codings):
        if coding not in (*CONTENT_CODINGS, "x-gzip"):
            raise HttpFrontEndError(
                415, f"the request body's Content-Encoding {coding[:40]!r} is not offered: "
                     f"send it as is, or with {' or '.join(CONTENT_CODINGS)}")
        if coding == "deflate":
            raw = body[:1] and body[0] & 0x0F != 8  # no zlib header: raw deflate data
            wbits = -zlib.MAX_WBITS if raw else zlib.MAX_WBITS
        else:
            wbits = 16 + zlib.MAX_WBITS
        body = _inflate(body, coding, wbits, limit)
    return body


def _inflate(data: bytes, coding: str, wbits: int, limit: int) -> bytes:
    """Decompress ``data`` (gzip: every member) up to ``limit`` bytes."""
    pieces: list[bytes] = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            piece = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise HttpFrontEndError(
                400, f"the request body is not {coding} data as its Content-Encoding says "
                     f"({exc})") from None
        pieces.append(piece)
        size += len(piece)
        if size > limit or inflater.unconsumed_tail:
            raise HttpFrontEndError(413, f"the request body is over the limit of {limit} "
                                         f"bytes (--max-message-bytes) once {coding} "
                                         "decoded")
        if not inflater.eof:
            raise HttpFrontEndError(400, f"the request body's {coding} data is cut short "
                                         "(its end is missing)")
        data = inflater.unused_data
        if not data:
            return b"".join(pieces)
        if wbits != 16 + zlib.MAX_WBITS:
            raise HttpFrontEndError(400, f"the request body has {len(data)} bytes after "
                                         f"the end of its {coding} data")


class HttpService:
    """The REST routes over a data plane; ``application()`` builds the aiohttp app.

    ``max_body_bytes`` bounds request bodies; with ``token`` every route but the health
    checks needs ``Authorization: Bearer <token>``. ``closing`` (set when the server
    drains) makes every answer close its connection.
    """

    def __init__(self, dataplane: DataPlane, max_body_bytes: int,
                 token: bytes | None = None) -> None:
        self._plane = dataplane
        self._limit = max_body_bytes
        self._token = token
        self.closing = False

    def application(self) -> web.Application:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._guard(request, handler)

        # aiohttp's own body limit: past it, reading the body raises (_body answers 413).
        # Bodies are decoded by decode_content, not aiohttp: it would answer a coding it
        # does not know with its own 400 (and a traceback in the log) before any route
        # runs, and a body that is not what its coding says with an exception of its own.
        app = web.Application(client_max_size=self._limit + 1, middlewares=[guard],
                              handler_args={"auto_decompress": False})
        model = "/v2/models/{model}"
        versioned = (model, model + "/versions/{version}")
        routes = [web.get("/v2/health/live", self.live), web.get("/v2/health/ready", self.ready),
                  web.get("/v2", self.server_metadata),
                  web.get("/v2/models/stats", self.statistics)]
        for prefix in versioned:
            routes += [web.get(prefix, self.model_metadata),
                       web.get(prefix + "/ready", self.model_ready),
                       web.get(prefix + "/config", self.model_config),
                       web.get(prefix + "/stats", self.statistics),
                       web.post(prefix + "/infer", self.infer)]
        routes += [web.post("/v2/repository/index", self.repository_index),
                   web.post("/v2/repository/models/{model}/load", self.load),
                   web.post("/v2/repository/models/{model}/unload", self.unload)]
        routes += [web.get("/v2/logging", self.log_settings),
                   web.post("/v2/logging", self.log_settings)]
        for path in ("/v2/trace/setting", model + "/trace/setting"):
            routes += [web.get(path, self.trace_settings), web.post(path, self.trace_settings)]
        shm = "/v2/systemsharedmemory"
        routes += [web.post(shm + "/region/{name}/register", self.shared_memory_register)]
        for prefix in (shm, shm + "/region/{name}"):
            routes += [web.post(prefix + "/unregister", self.shared_memory_unregister),
                       web.get(prefix + "/status", self.shared_memory_status)]
        cuda = "/v2/cudasharedmemory"
        routes += [web.post(cuda + "/region/{name}/register", self.cuda_shared_memory)]
        for prefix in (cuda, cuda + "/region/{name}"):
            routes += [web.post(prefix + "/unregister", self.cuda_shared_memory),
                       web.get(prefix + "/status", self.cuda_shared_memory)]
        app.add_routes(routes)
        return app

    # --- the one place failures become answers -------------------------------------------

    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate, run the route, answer its failure as JSON with its status, and
        close the connection after the answer while the server drains."""
        try:
            if self._token is not None and request.path not in OPEN_HTTP_PATHS:
                sent = request.headers.get("Authorization", "")
                refusal = bearer_refusal(sent.encode("latin-1", "replace"), self._token)
                if refusal is not None:
                    raise HttpFrontEndError(401, refusal)
            response = await handler(request)
        except HttpFrontEndError as exc:
            response = front_end_failure(exc)
        except web.HTTPException as exc:  # aiohttp's: no route, method not allowed, ...
            response = _error(exc.status, self._routing_message(request, exc))
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception as exc:
            if isinstance(exc, ServingError):
                log.info("%s %s failed: %s %s", request.method, request.path[:200],
                         exc.code, exc)
            else:
                log.error("%s %s failed unexpectedly", request.method, request.path[:200],
                          exc_info=exc)
            response = failure(exc)
        if self.closing:
            response.force_close()
        return response

    @staticmethod
    def _routing_message(request: web.Request, exc: web.HTTPException) -> str:
        path = request.path[:200]
        if exc.status == 404:
            return f"no such endpoint: {request.method} {path} (see the KServe V2 REST API)"
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            return f"{request.method} is not allowed on {path}; use {allowed}"
        return exc.text or exc.reason

    async def _body(self, request: web.Request) -> bytes:
        """The whole request body, decoded as its Content-Encoding says (decode_content).

        Raises:
            HttpFrontEndError: 413 past the limit (sent or decoded), 415 for a content
                coding not offered, 400 for a body that cannot be read (bad chunk framing,
                shorter than its Content-Length) or decoded: every failure to read a body
                is the client's.
        """
        limit = self._limit
        if request.content_length is not None and request.content_length > limit:
            raise HttpFrontEndError(413, f"the request body is {request.content_length} "
                                         f"bytes, over the limit of {limit} bytes "
                                         "(--max-message-bytes)")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = None
        except ConnectionError:  # the client left: nobody reads the answer
            raise HttpFrontEndError(400, "the connection closed before the whole request "
                                         "body came", code="CANCELLED") from None
        except (http_exceptions.HttpProcessingError, web.RequestPayloadError) as exc:
            # bad chunk framing, a body cut short, ...: aiohttp's parser error comes
            # wrapped in a RequestPayloadError
            cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
            detail = (cause.message if isinstance(cause, http_exceptions.HttpProcessingError)
                      else str(exc))
            raise HttpFrontEndError(400, f"the request body cannot be read: "
                                         f"{detail}") from None
        if body is None or len(body) > limit:
            raise HttpFrontEndError(413, f"the request body is over the limit of {limit} "
                                         "bytes (--max-message-bytes)")
        encoding = ",".join(request.headers.getall("Content-Encoding", ()))
        return decode_content(body, encoding, limit) if encoding else body

    async def _json_body(self, request: web.Request) -> dict:
        body = await self._body(request)
        return parse_header(body) if body.strip() else {}

    # --- health and metadata -------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._plane.live() else 400)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._plane.ready() else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        ready = self._plane.model_ready(request.match_info["model"],
                                        request.match_info.get("version", ""))
        return web.Response(status=200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        meta = self._plane.server_metadata()
        return _json({"name": meta.name, "version": meta.version,
                      "extensions": [*meta.extensions, BINARY_TENSOR_EXTENSION]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        meta = self._plane.model_metadata(request.match_info["model"],
                                          request.match_info.get("version", ""))

        def tensors(specs) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                    for t in specs]

        answer: dict[str, Any] = {"name": meta.name, "versions": meta.versions,
                                  "platform": meta.platform, "inputs": tensors(meta.inputs),
                                  "outputs": tensors(meta.outputs)}
        if meta.parameters:
            answer["parameters"] = dict(meta.parameters)
        return _json(answer)

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(message_json(self._plane.model_config(
            request.match_info["model"], request.match_info.get("version", ""))))

    async def statistics(self, request: web.Request) -> web.Response:
        chosen = self._plane.statistics(request.match_info.get("model", ""),
                                        request.match_info.get("version", ""))
        return _json({"model_stats": [statistics_json(stats) for stats in chosen]})

    # --- the model repository ------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        ready = (await self._json_body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise HttpFrontEndError(400, f"'ready' must be true or false, got {ready!r}")
        return _json([{"name": row.name, "version": row.version, "state": row.state,
                       "reason": row.reason}
                      for row in self._plane.repository.index(ready)])

    async def load(self, request: web.Request) -> web.Response:
        parameters = (await self._json_body(request)).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise HttpFrontEndError(400, "'parameters' must be a JSON object")
        await self._plane.repository.load(request.match_info["model"], list(parameters))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self._json_body(request)  # its parameters (unload_dependents) change nothing
        await self._plane.repository.unload(request.match_info["model"])
        return web.Response(status=200)

    # --- logging and tracing -------------------------------------------------------------

    async def log_settings(self, request: web.Request) -> web.Response:
        """GET: the log settings; POST: apply the body's changes (a JSON object of Triton's
        keys; empty: none) and answer the settings now in force (DataPlane.log_settings)."""
        updates = await self._json_body(request) if request.method == "POST" else None
        return _json(self._plane.logging.settings(updates))

    async def trace_settings(self, request: web.Request) -> web.Response:
        """501: tracing is not built (the message says what to use instead)."""
        self._plane.logging.trace_settings()

    # --- system shared memory ------------------------------------------------------------

    async def shared_memory_register(self, request: web.Request) -> web.Response:
        """Register the region named in the path: the body is ``{"key", "offset",
        "byte_size"}`` (``offset`` 0 when absent; other fields refused with 400), checked
        by SharedMemoryRegistry.register."""
        body = await self._json_body(request)
        name = request.match_info["name"]
        unknown = [key for key in body if key not in REGISTER_FIELDS]
        missing = [key for key in ("key", "byte_size") if key not in body]
        if unknown or missing:
            problems = ([f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown
                        else []) + ([f"no {' or '.join(map(repr, missing))}"] if missing
                                    else [])
            raise HttpFrontEndError(
                400, f"registering shared memory region {name!r}: {'; '.join(problems)}; "
                     'expected {"key": "/name", "offset": N, "byte_size": N} (offset '
                     "optional)")
        self._plane.shared_memory.register(name, body["key"], body.get("offset", 0),
                                           body["byte_size"])
        return web.Response(status=200)

    async def shared_memory_unregister(self, request: web.Request) -> web.Response:
        """Unregister the region named in the path, or every region (an unknown name is no
        error, as with Triton)."""
        self._plane.shared_memory.unregister(request.match_info.get("name", ""))
        return web.Response(status=200)

    async def shared_memory_status(self, request: web.Request) -> web.Response:
        """The region named in the path (404 when not registered), or every region: a list
        of ``{"name", "key", "offset", "byte_size"}``."""
        return _json([{"name": r.name, "key": r.key, "offset": r.offset,
                       "byte_size": r.byte_size}
                      for r in self._plane.shared_memory.status(
                          request.match_info.get("name", ""))])

    async def cuda_shared_memory(self, request: web.Request) -> web.Response:
        """501: CUDA shared memory is not offered."""
        cuda_shared_memory_unsupported()

    # --- inference -----------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        """Run an inference request. Every request is counted and logged once under the
        status it is answered with: by the data plane, or by ``_refused`` when the body
        cannot be read or is not an inference request."""
        received = time.perf_counter()
        timed = CLOCK.enabled
        started = time.perf_counter_ns() if timed else 0
        header: dict | None = None
        try:
            body = await self._body(request)
            length = header_length(request.headers.get(HEADER_LENGTH), len(body))
            view = memoryview(body)
            if length is None:
                header, binary = parse_header(body, "the inference request"), view[:0]
            else:
                header = parse_header(view[:length], f"the JSON header ({HEADER_LENGTH} "
                                                     f"{length} bytes)")
                binary = view[length:]
            parsed = infer_request(header, binary, request.match_info["model"],
                                   request.match_info.get("version", ""))
        except asyncio.CancelledError:
            # The client closed the connection while the body came (http_server.py runs
            # handlers with handler_cancellation): counted as the ConnectionError is.
            self._refused(request, HttpFrontEndError(
                400, "the connection closed before the whole request body came",
                code=CANCELLED), header, received)
            raise
        except Exception as exc:
            return self._refused(request, exc, header, received)
        if timed:
            CLOCK.add(stages.BUILD, started)

        def answer(result: InferResult) -> web.Response:
            encoding = time.perf_counter_ns() if timed else 0
            json_header, chunks = infer_response(result, parsed.sent_id or result.id,
                                                 parsed.binary)
            if chunks:
                response = web.Response(body=b"".join((json_header, *chunks)),
                                        content_type=_BINARY_TYPE)
                response.headers[HEADER_LENGTH] = str(len(json_header))
            else:
                response = web.Response(body=json_header, content_type=_JSON_TYPE)
            if timed:
                CLOCK.add(stages.ENCODE, encoding)
                CLOCK.add(stages.HANDLER, started)
            return response

        try:
            return await self._plane.infer(parsed.request, answer)
        except Exception as exc:  # the data plane counted and logged it
            response = failure(exc)
            response.headers[REQUEST_ID_HEADER] = parsed.request.id
            return response

    def _refused(self, request: web.Request, exc: Exception, header: dict | None,
                 received: float) -> web.Response:
        """Count, log (DataPlane.reject) and answer an inference request refused before
        the data plane saw it; the answer carries the request's id (the one sent, when
        the JSON header could be read, else a generated one)."""
        if isinstance(exc, HttpFrontEndError):
            code, reason = exc.code, str(exc)
        else:
            code = error_code(exc)
            reason = str(exc) if isinstance(exc, ServingError) else \
                f"internal error: {type(exc).__name__}: {exc}"
            if not isinstance(exc, ServingError):
                log.error("%s %s failed unexpectedly", request.method, request.path[:200],
                          exc_info=exc)
        sent_id = header.get("id") if header is not None else None
        request_id = self._plane.reject(
            request.match_info["model"], code, reason, protocol="http",
            request_id=sent_id if isinstance(sent_id, str) else "",
            seconds=time.perf_counter() - received)
        response = (front_end_failure(exc) if isinstance(exc, HttpFrontEndError)
                    else failure(exc))
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
