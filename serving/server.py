"""Start the gRPC server, load the repository, and shut down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from onnxserve.protos import inference_pb2, inference_pb2_grpc

from .auth import BearerTokenInterceptor, read_token, server_credentials
from .errors import ModelLoadError, NotFoundError
from .grpc_service import InferenceService
from .metrics import Metrics, registry_gauges
from .providers import announce
from .registry import READY, Registry
from .settings import ServerSettings

log = logging.getLogger(__name__)

#: Health entry that is SERVING while the process runs (for liveness probes).
LIVENESS_SERVICE = "liveness"
#: Seconds between the last admitted request finishing and the port closing.
LINGER_SECONDS = 0.5


class StartupError(RuntimeError):
    """The server cannot start: a port is taken or a file is unusable."""


SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


async def _update_health(
    servicer: health.aio.HealthServicer, registry: Registry, ready: bool
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    overall = serving if ready and registry.all_ready else not_serving
    for name in ("", SERVICE_NAME):
        await servicer.set(name, overall)
    for entry in registry.index():
        status = serving if ready and entry.state == READY else not_serving
        await servicer.set(entry.name, status)


async def serve(settings: ServerSettings, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set or the process gets SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    health_servicer = health.aio.HealthServicer()
    started = False

    async def models_changed() -> None:
        if started:
            await _update_health(health_servicer, registry, ready=service.accepting)

    metrics = Metrics()
    registry = Registry(settings.model_repository, settings, on_change=models_changed,
                        metrics=metrics)
    metrics.watch(registry_gauges(registry.index))
    try:
        initial_models = registry.initial_models()
    except (NotFoundError, ModelLoadError) as exc:  # before any port opens
        raise StartupError(str(exc)) from None
    service = InferenceService(registry, metrics)
    interceptors = []
    if settings.auth_token_file is not None:
        interceptors.append(BearerTokenInterceptor(read_token(settings.auth_token_file)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
    )
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(settings.tls_cert, settings.tls_key,
                                         settings.tls_client_ca)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise StartupError(f"cannot listen on {address}")
    if settings.metrics_port:
        try:
            metrics_port = metrics.serve(settings.grpc_host, settings.metrics_port)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on port {settings.metrics_port}: "
                               f"{exc} (choose another with --metrics-port, 0 = off)") from None
        log.info("metrics on http://%s:%d/metrics", settings.grpc_host, metrics_port)
    await _update_health(health_servicer, registry, ready=False)
    # Liveness: SERVING from start to exit, whatever the models do (orchestrators restart
    # a container whose liveness fails, which a slow model load must not cause).
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    log.info("gRPC server listening on %s:%d%s%s", settings.grpc_host, port,
             " with TLS" if settings.tls_cert else "",
             " (mutual)" if settings.tls_client_ca else "")

    if settings.providers != "cpu":
        await asyncio.to_thread(announce, settings.providers)
    await registry.load_initial(initial_models)
    started = True
    await _update_health(health_servicer, registry, ready=True)
    ready = sum(e.state == READY for e in registry.entries())
    log.info("ready: %d of %d models loaded (model control mode %s)", ready,
             len(registry.entries()), settings.model_control_mode)
    watcher = (asyncio.create_task(registry.watch(stop))
               if settings.model_control_mode == "poll" else None)

    await stop.wait()
    if watcher is not None:
        await watcher
    log.info("stopping: finishing in-flight requests (up to %.0fs)", settings.drain_seconds)
    service.accepting = False
    await _update_health(health_servicer, registry, ready=False)
    if not await service.drain(settings.drain_seconds):
        log.warning("requests still running after %.0fs are cancelled", settings.drain_seconds)
    # New requests keep getting UNAVAILABLE (and health NOT_SERVING) for a moment, so
    # clients and load balancers move away before the port closes.
    await asyncio.sleep(min(LINGER_SECONDS, settings.drain_seconds))
    await server.stop(1.0)
    await registry.close()
    service.close()
    metrics.close()
    log.info("stopped")
