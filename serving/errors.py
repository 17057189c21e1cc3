"""Errors the serving layers raise, each with its canonical error code.

``code`` is the name of the canonical error code (google.rpc.Code: ``INVALID_ARGUMENT``,
``NOT_FOUND``, ...) that both KServe V2 bindings use; each front end maps it to its own
status (a gRPC status code, an HTTP status), so no layer below the front ends knows a
transport, and the metrics' ``status`` label is the same whatever the transport.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request or operation failed with a message meant for the caller."""

    code = "INTERNAL"


class NotFoundError(ServingError):
    """The model or version named by the request does not exist."""

    code = "NOT_FOUND"


class InvalidInputError(ServingError):
    """The request does not match the model: names, datatypes, shapes or sizes."""

    code = "INVALID_ARGUMENT"


class UnavailableError(ServingError):
    """The model exists but is not ready (failed to load, unloading, or shutting down)."""

    code = "UNAVAILABLE"


class SchedulerClosedError(UnavailableError):
    """The model version was unloaded or replaced between lookup and queueing."""


class QueueTimeoutError(UnavailableError):
    """The queue policy's timeout expired with ``timeout_action: REJECT`` before the request
    ran: Triton answers such a request UNAVAILABLE "Request timeout expired" (its dynamic
    batcher's rejected requests), and so does onnxserve."""


class QueueFullError(UnavailableError):
    """The model version's queue holds ``max_queue_size`` requests. Triton answers it
    UNAVAILABLE (HTTP 503, "Exceeds maximum queue size"), the code gRPC names retryable,
    so the retry policies written for Triton retry it; so does onnxserve."""


class AlreadyExistsError(ServingError):
    """The name the operation would create is taken (a shared memory region's name)."""

    code = "ALREADY_EXISTS"


class FailedPreconditionError(ServingError):
    """The server is not in a state that allows the operation (e.g. model control is off)."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(ServingError):
    """The request or its answer is larger than the transport may carry
    (``--max-message-bytes``), as gRPC answers a message over its limit."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(ServingError):
    """The request's deadline or queue timeout passed before it could run."""

    code = "DEADLINE_EXCEEDED"


class InferenceFailedError(ServingError):
    """The runtime failed while executing a batch."""

    code = "INTERNAL"


class UnimplementedError(ServingError):
    """The server does not offer the operation (a protocol extension it does not build)."""

    code = "UNIMPLEMENTED"


class ModelLoadError(ServingError):
    """A model could not be loaded; the message says which file or field and why."""

    code = "INVALID_ARGUMENT"


#: the code of a failure that is not a ServingError (a bug): the canonical INTERNAL
INTERNAL = "INTERNAL"
#: the canonical code of a request whose caller left before its answer (a cancelled gRPC
#: call or stream, a closed HTTP connection): counted so in the metrics, answered to no one
CANCELLED = "CANCELLED"


def error_code(exc: BaseException) -> str:
    """The canonical error code a failure is answered with."""
    return exc.code if isinstance(exc, ServingError) else INTERNAL
