"""Start the gRPC server, load the repository, and shut down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from onnxserve.protos import inference_pb2, inference_pb2_grpc

from .grpc_service import InferenceService
from .registry import READY, Registry
from .settings import ServerSettings

log = logging.getLogger(__name__)

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

    registry = Registry(settings.model_repository, settings, on_change=models_changed)
    service = InferenceService(registry)
    server = grpc.aio.server(
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
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await _update_health(health_servicer, registry, ready=False)
    await server.start()
    log.info("gRPC server listening on %s:%d", settings.grpc_host, port)

    await registry.load_initial()
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
    await server.stop(settings.drain_seconds)
    await registry.close()
    service.close()
    log.info("stopped")
