"""The KServe V2 HTTP/REST front end (with Triton's extensions): a thin adapter over the
data plane.

Each route turns its request into a data-plane call (serving/dataplane.py) and the result
into JSON (http_answers.py: every failure answered as ``{"error": "..."}`` with the status
of its canonical code); tensors go through http_codec.py, request bodies through
http_body.py (the size limit, content codings). Health answers 200 for true and 400 for
false, as Triton does. The extensions' routes (repository, logging, tracing, shared
memory) are http_extensions.py's.

Routes (``[/versions/{v}]`` is optional):

    GET  /v2/health/live, /v2/health/ready       GET  /v2
    GET  /v2/models/{m}[/versions/{v}]           GET  /v2/models/{m}[/versions/{v}]/ready
    GET  /v2/models/{m}[/versions/{v}]/config    GET  /v2/models[/{m}[/versions/{v}]]/stats
    POST /v2/models/{m}[/versions/{v}]/infer

An inference request refused before the data plane runs it (a body that cannot be read or
decoded, JSON that is not an inference request) is counted and logged as the data plane
counts the others (DataPlane.reject). While the server drains, every answer closes its
connection.

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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from onnxserve.serving.contract import InferResult
from onnxserve.serving.dataplane import DataPlane
from onnxserve.serving.errors import CANCELLED, ServingError, error_code
from onnxserve.serving.frontends.auth import OPEN_HTTP_PATHS, bearer_refusal
from onnxserve.serving.frontends.http_answers import (
    BINARY_TYPE,
    JSON_TYPE,
    REQUEST_ID_HEADER,
    HttpFrontEndError,
    error_response,
    failure,
    front_end_failure,
    json_response,
    message_json,
    statistics_json,
)
from onnxserve.serving.frontends.http_body import read_body
from onnxserve.serving.frontends.http_codec import (
    HEADER_LENGTH,
    header_length,
    infer_request,
    infer_response,
    parse_header,
)
from onnxserve.serving.frontends.http_extensions import ExtensionRoutes
from onnxserve.serving.observability import stages
from onnxserve.serving.observability.stages import CLOCK
from onnxserve.serving.observability.tracing import trace_context

log = logging.getLogger(__name__)

#: Triton's name for the binary tensor extension, which only this front end offers
BINARY_TENSOR_EXTENSION = "binary_tensor_data"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        routes += ExtensionRoutes(self._plane, self._limit).routes()
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
            response = error_response(exc.status, self._routing_message(request, exc))
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
        return json_response({"name": meta.name, "version": meta.version,
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
        return json_response(answer)

    async def model_config(self, request: web.Request) -> web.Response:
        return json_response(message_json(self._plane.model_config(
            request.match_info["model"], request.match_info.get("version", ""))))

    async def statistics(self, request: web.Request) -> web.Response:
        chosen = self._plane.statistics(request.match_info.get("model", ""),
                                        request.match_info.get("version", ""))
        return json_response({"model_stats": [statistics_json(stats) for stats in chosen]})

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
            body = await read_body(request, self._limit)
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
        if self._plane.tracing.active:
            parsed.request.trace_context = trace_context(request.headers.items)

        def answer(result: InferResult) -> web.Response:
            encoding = time.perf_counter_ns() if timed else 0
            json_header, chunks = infer_response(result, parsed.sent_id or result.id,
                                                 parsed.binary)
            if chunks:
                response = web.Response(body=b"".join((json_header, *chunks)),
                                        content_type=BINARY_TYPE)
                response.headers[HEADER_LENGTH] = str(len(json_header))
            else:
                response = web.Response(body=json_header, content_type=JSON_TYPE)
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
