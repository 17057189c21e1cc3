"""The REST routes of Triton's extensions beside inference: the model repository, logging,
tracing and system shared memory (CUDA shared memory answers 501).

Each route turns its request into a call on the data plane's handlers
(serving/handlers.py's RepositoryHandlers and LogHandlers, serving/shared_memory.py's
registry) and the result into JSON. Logging reads (GET) or changes (POST, a JSON object of
Triton's keys) the log settings and answers them as a JSON object; a register body is
``{"key", "offset", "byte_size"}`` (``offset`` 0 when absent) and a status answer Triton's
list of ``{"name", "key", "offset", "byte_size"}``. Tracing and CUDA shared memory are not
built: their routes answer 501 with what to use instead.

Routes:

    POST /v2/repository/index                    POST /v2/repository/models/{m}/load
    POST /v2/repository/models/{m}/unload        GET, POST /v2/logging
    GET, POST /v2[/models/{m}]/trace/setting
    POST /v2/systemsharedmemory/region/{name}/register
    POST /v2/systemsharedmemory[/region/{name}]/unregister
    GET  /v2/systemsharedmemory[/region/{name}]/status
    and the same three under /v2/cudasharedmemory
"""

from __future__ import annotations

import json

from aiohttp import web

from onnxserve.serving.dataplane import DataPlane
from onnxserve.serving.errors import InvalidInputError
from onnxserve.serving.frontends.http_answers import HttpFrontEndError, json_response
from onnxserve.serving.frontends.http_body import read_json_body
from onnxserve.serving.shared_memory import cuda_shared_memory_unsupported

#: the fields of a system shared memory register body (Triton's)
REGISTER_FIELDS = ("key", "offset", "byte_size")


class ExtensionRoutes:
    """The extensions' REST routes over a data plane; ``max_body_bytes`` bounds request
    bodies."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int) -> None:
        self._plane = dataplane
        self._limit = max_body_bytes

    def routes(self) -> list[web.RouteDef]:
        """The routes listed in the module docstring."""
        routes = [web.post("/v2/repository/index", self.repository_index),
                  web.post("/v2/repository/models/{model}/load", self.load),
                  web.post("/v2/repository/models/{model}/unload", self.unload),
                  web.get("/v2/logging", self.log_settings),
                  web.post("/v2/logging", self.log_settings)]
        for path in ("/v2/trace/setting", "/v2/models/{model}/trace/setting"):
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
        return routes

    # --- the model repository ------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        ready = (await read_json_body(request, self._limit)).get("ready", False)
        if not isinstance(ready, bool):
            raise HttpFrontEndError(400, f"'ready' must be true or false, got {ready!r}")
        return json_response([{"name": row.name, "version": row.version, "state": row.state,
                       "reason": row.reason}
                      for row in self._plane.repository.index(ready)])

    async def load(self, request: web.Request) -> web.Response:
        parameters = (await read_json_body(request, self._limit)).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise HttpFrontEndError(400, "'parameters' must be a JSON object")
        await self._plane.repository.load(request.match_info["model"], list(parameters))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        # its parameters (unload_dependents) change nothing
        await read_json_body(request, self._limit)
        await self._plane.repository.unload(request.match_info["model"])
        return web.Response(status=200)

    # --- logging and tracing -------------------------------------------------------------

    async def log_settings(self, request: web.Request) -> web.Response:
        """GET: the log settings; POST: apply the body's changes (a JSON object of Triton's
        keys; empty: none) and answer the settings now in force (LogHandlers.settings)."""
        updates = await read_json_body(request, self._limit) if request.method == "POST" else None
        return json_response(self._plane.logging.settings(updates))

    async def trace_settings(self, request: web.Request) -> web.Response:
        """GET: the trace settings (of the model in the path, else the global ones); POST:
        apply the body's changes first, a JSON object of Triton's keys whose values are a
        string, a list of strings, or null (clears the key). Answered as Triton's HTTP API
        does: ``trace_level`` a list, the other keys a string (a list when they hold
        several values)."""
        updates: dict[str, list[str] | None] = {}
        if request.method == "POST":
            body = await read_json_body(request, self._limit)
            for key, value in body.items():
                if value is None or isinstance(value, str):
                    updates[key] = None if value is None else [value]
                elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                    updates[key] = value
                else:
                    raise InvalidInputError(
                        f"trace setting {key!r}: expected a string, a list of strings or "
                        f"null, not {json.dumps(value)}")
        settings = self._plane.trace.settings(request.match_info.get("model", ""), updates)
        return json_response({key: values if key == "trace_level" or len(values) != 1
                              else values[0] for key, values in settings.items()})

    # --- system shared memory ------------------------------------------------------------

    async def shared_memory_register(self, request: web.Request) -> web.Response:
        """Register the region named in the path: the body is ``{"key", "offset",
        "byte_size"}`` (``offset`` 0 when absent; other fields refused with 400), checked
        by SharedMemoryRegistry.register."""
        body = await read_json_body(request, self._limit)
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
        return json_response([{"name": r.name, "key": r.key, "offset": r.offset,
                       "byte_size": r.byte_size}
                      for r in self._plane.shared_memory.status(
                          request.match_info.get("name", ""))])

    async def cuda_shared_memory(self, request: web.Request) -> web.Response:
        """501: CUDA shared memory is not offered."""
        cuda_shared_memory_unsupported()
