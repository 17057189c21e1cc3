"""Start the gRPC and HTTP servers, load the repository, and shut down cleanly on
SIGTERM/SIGINT.

Both front ends run on one event loop over one data plane. A stop (SIGTERM, SIGINT or the
``stop`` event) is honoured in every phase: before the ports open serve() returns; while
models load, the loads still running are abandoned and the server never reports ready;
while serving, new requests are refused with UNAVAILABLE (HTTP 503, and every HTTP answer
closes its connection; a request on a keep-alive connection idle when the stop began is
answered too), admitted ones finish (up to ``drain_seconds``), refusals go on for
LINGER_SECONDS, the HTTP server closes, and the process ends with status 0 (see
_exit_process for why it ends instead of returning).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import NoReturn

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.dataplane import DataPlane
from onnxserve.serving.errors import ModelLoadError, NotFoundError
from onnxserve.serving.frontends import native
from onnxserve.serving.frontends.auth import (
    BearerTokenInterceptor,
    read_token,
    server_credentials,
    ssl_context,
)
from onnxserve.serving.frontends.grpc_service import InferenceService
from onnxserve.serving.frontends.health import SERVICE_NAME, mark_live, update_health
from onnxserve.serving.frontends.http_server import HttpServer
from onnxserve.serving.frontends.http_server import bind as bind_http
from onnxserve.serving.frontends.http_service import HttpService
from onnxserve.serving.frontends.native.server import NativeServer
from onnxserve.serving.models.registry import Registry
from onnxserve.serving.observability import profiling
from onnxserve.serving.observability.metrics import Metrics, registry_gauges
from onnxserve.serving.observability.stages import CLOCK
from onnxserve.serving.observability.tracing import Tracing, parse_trace_config
from onnxserve.serving.observability.triton_metrics import triton_families
from onnxserve.serving.runtime.providers import announce
from onnxserve.serving.settings import ServerSettings, port_unavailable

log = logging.getLogger(__name__)

#: Seconds between the last admitted request finishing and the port closing.
LINGER_SECONDS = 0.5


class StartupError(RuntimeError):
    """The server cannot start: a port is taken or a file is unusable."""


def _add_grpc_port(server: grpc.aio.Server | NativeServer, settings: ServerSettings) -> int:
    """Bind the gRPC port (TLS when configured); returns the bound port.

    gRPC core reports a failed bind by raising a RuntimeError that only says to set
    GRPC_VERBOSITY, after printing the reason itself on stderr ("E... add_port.cc] ...
    Address already in use"). Its stderr is captured for the call: the reason goes into
    the one-line error, and anything else it printed is passed on.

    Raises:
        StartupError: the address cannot be bound (taken, not this machine's, unresolvable).
    """
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    with tempfile.TemporaryFile() as captured:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            if isinstance(server, NativeServer):
                port = server.add_port(address, tls_cert=settings.tls_cert,
                                       tls_key=settings.tls_key,
                                       tls_client_ca=settings.tls_client_ca)
            elif settings.tls_cert is not None and settings.tls_key is not None:
                credentials = server_credentials(settings.tls_cert, settings.tls_key,
                                                 settings.tls_client_ca)
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.5x; older ones returned 0
            port = 0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        printed = captured.read().decode(errors="replace")
    if port == 0:
        raise StartupError(port_unavailable(settings, "grpc_port", _bind_reason(printed)))
    if printed:
        os.write(2, printed.encode())
    return port


def _bind_reason(printed: str) -> str:
    """The reason in gRPC core's bind failure lines: ``... (Error in bind for address
    '[::]:8001': Address already in use)`` (grpcio), or ``... os_error:"Address already in
    use" ...`` (the native transport's gRPC C++) -> ``Address already in use``."""
    found = re.findall(r"Error in bind for address '[^']*': ([^)]+)\)", printed)
    if found:
        return found[-1].strip()
    found = re.findall(r'os_error:"([^"]+)"', printed)  # gRPC C++ 1.51's error tree
    if found:
        return found[-1].strip()
    lines = [line.split("] ", 1)[-1].strip().removeprefix("Failed to add port to server: ")
             for line in printed.splitlines() if line.strip()]
    return lines[-1] if lines else "gRPC could not bind it"


def grpc_options(settings: ServerSettings, *,
                 share_port: bool = False) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message limits, keepalive and ping policy, and
    whether the port may be shared.

    The names are gRPC core's (GRPC_ARG_KEEPALIVE_TIME_MS, ...), set from the flags Triton
    names --grpc-keepalive-time etc.; settings.py says why the defaults differ from Triton's.
    gRPC sets SO_REUSEPORT unless told not to (GRPC_ARG_ALLOW_REUSEPORT): only the workers
    of one ``--workers N`` supervisor (``share_port``) may share the port; any other server
    already on it makes the start fail, as Triton's does.
    """
    return [
        ("grpc.so_reuseport", int(share_port)),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls",
         int(settings.grpc_keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", settings.grpc_http2_max_pings_without_data),
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS (the "recv" is not in the name)
        ("grpc.http2.min_ping_interval_without_data_ms",
         settings.grpc_http2_min_recv_ping_interval_without_data_ms),
        ("grpc.http2.max_ping_strikes", settings.grpc_http2_max_ping_strikes),
    ]


def grpc_transport(choice: str) -> str:
    """The transport that carries gRPC calls for ``--grpc-transport choice``: ``native``
    when asked for or (``auto``) when built, else ``python``; ``auto`` without it logs one
    warning line.

    Raises:
        StartupError: ``native`` asked for but not built, naming what to install.
    """
    if choice == "python":
        return "python"
    if native.transport is not None:
        return "native"
    missing = (f"the native gRPC transport is not built ({native.BUILD_PROBLEM}): install "
               "gRPC C++ (Debian/Ubuntu: apt-get install libgrpc++-dev pkg-config) and "
               "reinstall onnxserve (docs/serving.md)")
    if choice == "native":
        raise StartupError(f"--grpc-transport native: {missing}; or use --grpc-transport "
                           "python")
    log.warning("%s; grpcio serves gRPC meanwhile", missing)
    return "python"


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[object]) -> bool:
    """Run ``work`` to its end (True), or cancel it when ``stop`` is set first (False).

    Raises whatever ``work`` raises when it ends first. A thread ``work`` waits on (a model
    load in asyncio.to_thread) cannot be interrupted: it runs on until the process exits.
    """
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not stop.is_set():
        task.result()
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as exc:  # ended (and failed) just as the stop came: moot now
        log.debug("abandoned at stop: %s", exc)
    return False


def _exit_process(status: int) -> NoReturn:
    """End the process at once with ``status``, after flushing the logs and stdio.

    The gRPC server is not stopped with grpc's ``server.stop()``: that cancels, with status
    CANCELLED (which clients do not retry), every call that reached the server after the
    stop began and before a handler took it, and a client that keeps sending (retrying each
    UNAVAILABLE) always has such calls in flight. Ending the process closes every
    connection instead, so whatever is still in flight fails UNAVAILABLE, which clients
    retry elsewhere. By this point admitted requests have been answered (the drain) and new
    ones refused for LINGER_SECONDS. Threads still loading a model end with the process.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


class Server:
    """One server process's lifecycle, in named phases (as uvicorn's ``Server``):

    - ``startup``: build the metrics, the model registry and the data plane, bind the
      gRPC, HTTP and metrics ports (a port in use stops the start before anything is
      served), then listen;
    - ``main_loop``: probe the GPUs, load the models meant to load at start, report
      readiness, watch the repository in poll mode, and wait for the stop;
    - ``shutdown``: refuse new requests, drain the admitted ones, linger, close, exit.

    ``share_ports``: bind the gRPC and HTTP ports with SO_REUSEPORT, for the workers of one
    ``--workers N`` supervisor (serving/workers.py); otherwise a port another server
    listens on fails the start.
    """

    def __init__(self, settings: ServerSettings, *, share_ports: bool = False) -> None:
        self.settings = settings
        self.share_ports = share_ports
        self.stop = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics()
        self.registry = Registry(settings.model_repository, settings,
                                 on_change=self._models_changed, metrics=self.metrics)
        self.plane = DataPlane(self.registry, self.metrics,
                               Tracing(parse_trace_config(settings.trace_config)))
        self.grpc: grpc.aio.Server | NativeServer | None = None
        #: what carries gRPC calls: "native" or "python" (--grpc-transport)
        self.grpc_transport = ""
        self.grpc_port = 0
        self.http: HttpServer | None = None
        #: whether the start-up loads ended and readiness was reported
        self._serving = False
        #: the readiness last logged (ready, reason)
        self._readiness_reported: tuple[bool, str] | None = None

    async def serve(self, stop: asyncio.Event | None = None,
                    on_ready: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` is set or the process gets SIGTERM/SIGINT, then end the
        process (see ``serve`` below)."""
        if stop is not None:
            self.stop = stop
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        if not await self.startup():
            return
        await self.main_loop(on_ready)
        await self.shutdown("")

    # --- start-up ------------------------------------------------------------------------

    async def startup(self) -> bool:
        """Bind every port and start listening; False when stopped before the ports opened
        (then nothing was served and everything is closed).

        Raises:
            StartupError: a port cannot be bound, or the models named to load at start are
                not in the repository.
            AuthError: the token file is unusable.
        """
        settings = self.settings
        self.metrics.watch(registry_gauges(self.registry.index))
        self.metrics.watch(triton_families(self.registry.index, self.metrics))
        CLOCK.enabled = settings.stage_timing
        if settings.stage_timing:
            self.metrics.watch(CLOCK.metric_families)
        try:
            self._initial_models = self.registry.listing.initial_models()
        except (NotFoundError, ModelLoadError) as exc:  # before any port opens
            raise StartupError(str(exc)) from None
        token = read_token(settings.auth_token_file) if settings.auth_token_file else None
        self._bind(token)
        await update_health(self.health, self.plane, ready=False)
        await mark_live(self.health)
        if self.stop.is_set():  # stopped while setting up: nothing was served
            if isinstance(self.grpc, NativeServer):  # it takes calls from the bind on
                await self.grpc.stop(0)
            self.metrics.close()
            if self.http is not None:
                await self.http.stop()
            log.info("stopped before the port opened")
            return False
        await self._listen()
        return True

    def _bind(self, token: bytes | None) -> None:
        """Build the gRPC server and bind its port, then the HTTP and metrics ports."""
        settings, plane = self.settings, self.plane
        interceptors = [BearerTokenInterceptor(token)] if token is not None else []
        options = grpc_options(settings, share_port=self.share_ports)
        self.grpc_transport = grpc_transport(settings.grpc_transport)
        server: grpc.aio.Server | NativeServer = (
            NativeServer(interceptors, options) if self.grpc_transport == "native"
            else grpc.aio.server(interceptors=interceptors, options=options))
        service = InferenceService(plane, max_message_bytes=settings.max_message_bytes)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.grpc, self.grpc_port = server, _add_grpc_port(server, settings)
        if settings.http_port:
            try:
                http_socket = bind_http(settings.grpc_host, settings.http_port,
                                        share=self.share_ports)
            except OSError as exc:
                raise StartupError(port_unavailable(settings, "http_port", exc)) from None
            tls = (ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                   if settings.tls_cert is not None and settings.tls_key is not None else None)
            self.http = HttpServer(HttpService(plane, settings.max_message_bytes, token),
                                   http_socket, tls, grpc_port=self.grpc_port)
        if settings.metrics_port:
            try:
                metrics_port = self.metrics.serve(settings.grpc_host, settings.metrics_port)
            except OSError as exc:
                raise StartupError(port_unavailable(settings, "metrics_port", exc)) from None
            guards = [what for what, on in (("TLS", settings.tls_cert is not None),
                                            ("the token", token is not None)) if on]
            log.info("metrics on http://%s:%d/metrics%s", settings.grpc_host, metrics_port,
                     f" (plain HTTP, open to all: {' and '.join(guards)} "
                     f"guard{'s' if len(guards) == 1 else ''} gRPC and HTTP/REST only; "
                     "--metrics-port 0 turns it off)" if guards else "")

    async def _listen(self) -> None:
        settings = self.settings
        assert self.grpc is not None
        await self.grpc.start()
        log.info("gRPC server listening on %s:%d%s%s (%s transport)", settings.grpc_host,
                 self.grpc_port, " with TLS" if settings.tls_cert else "",
                 " (mutual)" if settings.tls_client_ca else "", self.grpc_transport)
        if self.http is not None:
            await self.http.start()
            log.info("HTTP server listening on %s:%d%s", settings.grpc_host, self.http.port,
                     " with TLS" if settings.tls_cert else "")

    # --- serving -------------------------------------------------------------------------

    async def main_loop(self, on_ready: Callable[[], None] | None = None) -> None:
        """Load the start-up models, report readiness (``on_ready`` then), serve until the
        stop; a stop during the GPU probe or the loads shuts down at once."""
        settings = self.settings
        if settings.providers != "cpu" and not await _unless_stopped(
                self.stop, asyncio.to_thread(announce, settings.providers)):
            await self.shutdown(" while probing the GPUs")
        if not await _unless_stopped(self.stop,
                                     self.registry.load_initial(self._initial_models)):
            await self.shutdown(" while loading models (the loads not done are abandoned)")
        self._serving = True
        await update_health(self.health, self.plane, ready=True)
        self._report_readiness()
        profiling.start_from_environment()  # after loading: warm-up decisions stay unprofiled
        if on_ready is not None:
            on_ready()
        watcher = (asyncio.create_task(self.registry.watch(self.stop))
                   if settings.model_control_mode == "poll" else None)
        await self.stop.wait()
        if watcher is not None:
            watcher.cancel()  # a reload in progress is abandoned; the loaded model serves on
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _models_changed(self) -> None:
        """The registry's models changed: the health service follows once serving."""
        if self._serving:
            await update_health(self.health, self.plane, ready=self.plane.accepting)
            if self.plane.accepting:
                self._report_readiness()

    def _report_readiness(self) -> None:
        """Log what readiness answers, at start and each time the models change it."""
        ready, why = self.registry.readiness()
        if (ready, why) == self._readiness_reported:
            return
        self._readiness_reported = (ready, why)
        if not ready:
            log.warning("not ready: %s (readiness answers NOT_SERVING: gRPC ServerReady "
                        "false, HTTP /v2/health/ready 400, grpc.health.v1 NOT_SERVING)", why)
        else:
            log.log(logging.INFO if self.registry.strictly_ready() else logging.WARNING,
                    "ready: %s (readiness answers SERVING)", why)

    # --- shutdown ------------------------------------------------------------------------

    async def shutdown(self, during: str) -> NoReturn:
        """Refuse new requests, let the admitted ones finish, linger, close and end the
        process with status 0 (see _exit_process)."""
        settings, plane, http = self.settings, self.plane, self.http
        log.info("stopping%s: finishing in-flight requests (up to %.0fs)", during,
                 settings.drain_seconds)
        plane.stop_accepting()
        if http is not None:
            http.drain()
        await update_health(self.health, plane, ready=False)
        drained = await plane.drain(settings.drain_seconds)
        if not drained:
            log.warning("requests still running after %.0fs fail UNAVAILABLE when the "
                        "process exits", settings.drain_seconds)
        # New requests keep getting UNAVAILABLE (and health NOT_SERVING) for a moment, so
        # clients and load balancers move away before the port closes.
        await asyncio.sleep(min(LINGER_SECONDS, settings.drain_seconds))
        if http is not None:
            # First, while the event loop is free: a connection the kernel queues while the
            # loop is busy (metrics.close() blocks it for up to 0.5 s) would be reset when
            # the port closes, with the request its client already sent.
            await http.stop()
        if CLOCK.enabled:
            log.info("stage timing, mean per request: %s", CLOCK.summary())
        profiling.write_profile()
        if drained:  # else closing would wait for the runs still going; the exit ends them
            await self.registry.close()
        plane.close()
        self.metrics.close()
        log.info("stopped")
        _exit_process(0)


async def serve(settings: ServerSettings, stop: asyncio.Event | None = None,
                on_ready: Callable[[], None] | None = None, *,
                share_ports: bool = False) -> None:
    """Serve until ``stop`` is set or the process gets SIGTERM/SIGINT, then end the process.

    ``on_ready`` is called once, when the models meant to load at start have loaded (or
    failed) and the server reports ready. Returns only when stopped before the port opened;
    once it is open, a stop ends the process with status 0 (see _exit_process).
    ``share_ports``: see Server.

    Raises:
        StartupError: the gRPC, HTTP or metrics port cannot be bound, or the models named
            to load at start are not in the repository.
        AuthError: the token file is unusable.
    """
    await Server(settings, share_ports=share_ports).serve(stop, on_ready)
