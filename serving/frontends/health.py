"""grpc.health.v1.Health: what orchestrators probe, kept in step with the models.

Entries: ``""`` and the inference service's name (readiness: SERVING when the server is
ready, i.e. accepting and every model it is meant to serve is loaded), one per model
(SERVING when that model is ready), and ``liveness`` (SERVING from start to exit, whatever
the models do: orchestrators restart a container whose liveness fails, which a slow model
load must not cause).
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from onnxserve.protos import inference_pb2
from onnxserve.serving.dataplane import DataPlane

#: Health entry that is SERVING while the process runs (for liveness probes).
LIVENESS_SERVICE = "liveness"
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def mark_live(servicer: health.aio.HealthServicer) -> None:
    """The liveness entry: SERVING until the process exits."""
    await servicer.set(LIVENESS_SERVICE, _SERVING)


async def update_health(servicer: health.aio.HealthServicer, plane: DataPlane,
                        ready: bool) -> None:
    """Set the server's and each model's entry from the data plane's readiness, which the
    other front ends read too; ``ready`` false marks all NOT_SERVING (starting or
    stopping)."""
    overall = _SERVING if ready and plane.ready() else _NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, overall)
    for name, model_ready in plane.models_ready().items():
        await servicer.set(name, _SERVING if ready and model_ready else _NOT_SERVING)
