"""Errors the serving layers raise; grpc_service maps each kind to a gRPC status code.

The layers below the gRPC service (validation, scheduler, runner, registry) raise these
without knowing about gRPC, so the service is the only place that speaks status codes.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request or operation failed with a message meant for the caller."""


class NotFoundError(ServingError):
    """The model or version named by the request does not exist."""


class InvalidInputError(ServingError):
    """The request does not match the model: names, datatypes, shapes or sizes."""


class UnavailableError(ServingError):
    """The model exists but is not ready (failed to load, unloading, or shutting down)."""


class SchedulerClosedError(UnavailableError):
    """The model version was unloaded or replaced between lookup and queueing."""


class FailedPreconditionError(ServingError):
    """The server is not in a state that allows the operation (e.g. model control is off)."""


class ResourceExhaustedError(ServingError):
    """The server cannot take the request now (queue full)."""


class DeadlineExceededError(ServingError):
    """The request's deadline or queue timeout passed before it could run."""


class InferenceFailedError(ServingError):
    """The runtime failed while executing a batch."""


class ModelLoadError(ServingError):
    """A model could not be loaded; the message says which file or field and why."""
