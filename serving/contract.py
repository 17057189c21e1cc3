"""The data plane's contract in plain values: what a transport hands the data plane and what
it gets back (serving/dataplane.py's operations take and return these).

They live apart from dataplane.py, which imports the model lifecycle (models/, batching/,
runtime/ and so onnxruntime), so that the front ends' codecs (frontends/decoding.py,
encoding.py, http_codec.py) and any new transport import them cheaply: this module imports
only numpy, the shared types and shared_memory.py's parameter values
(tests/unit/wire/test_wire_imports.py imports the codecs with onnxruntime blocked).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from onnxserve.serving.shared_memory import SharedMemoryOutput, SharedMemoryParameters
from onnxserve.serving.types import TensorSpec

#: the request parameters the data plane reads, by their protocol names: an output's
#: classification extension (top-k) and a request's own queue timeout (microseconds)
CLASSIFICATION_PARAMETER = "classification"
TIMEOUT_PARAMETER = "timeout"

#: Set by a front end, in the task that serves a request, when other requests are in
#: progress on it (calls taken and not yet answered: e.g. a group that arrived while the
#: event loop was busy). A request that knows of none, and finds its model's queue empty,
#: runs at once on its own (a tiny model's fastest answer); one that does waits, for one
#: event loop turn, to be batched with them (serving/batching/scheduler.py). False when the
#: front end cannot tell (grpcio's and the HTTP transports).
OTHERS_IN_PROGRESS: ContextVar[bool] = ContextVar("onnxserve_others_in_progress",
                                                  default=False)


@dataclass(slots=True)
class RequestInput:
    """One input as a request declares it; ``decode()`` returns its array (the front end's
    decoder, called only after the declaration passed the model's checks; it raises
    TensorCodecError for a payload that does not match). An input with ``shared_memory``
    parameters (serving/shared_memory.py's ``shared_memory_parameters``) is read from that
    region instead, and ``decode`` is not called."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    decode: Callable[[], np.ndarray]
    shared_memory: SharedMemoryParameters | None = None


@dataclass(slots=True)
class RequestedOutput:
    """An output a request asks for, with its ``classification`` parameter (any type, as
    sent; None when absent) and its shared memory parameters (written into that region
    when given)."""

    name: str
    classification: object = None
    shared_memory: SharedMemoryParameters | None = None


@dataclass(slots=True)
class InferRequest:
    """One inference request in plain values. ``id`` is replaced by a generated one when
    empty (the front end reads it back for its error answers)."""

    model_name: str
    model_version: str
    inputs: Sequence[RequestInput]
    outputs: Sequence[RequestedOutput] = ()
    id: str = ""
    #: the request's own queue timeout parameter, as sent (microseconds)
    timeout: object = None
    #: seconds until the caller's deadline (None: no deadline)
    time_remaining: float | None = None
    #: the front end's transport, the metrics' ``protocol`` label (grpc or http)
    protocol: str = "grpc"
    #: the caller's W3C trace context (traceparent, tracestate), read by the front end
    #: while tracing is on (None: none, or tracing off)
    trace_context: dict[str, str] | None = None


@dataclass(slots=True)
class InferResult:
    """The answer: each output's array in the order asked for (BYTES as object arrays);
    ``shared_memory`` names the outputs written into shared memory (None: none), which
    the answer reports by serving/shared_memory.py's ``output_parameters`` instead of
    their data."""

    model_name: str
    model_version: str
    id: str
    outputs: list[tuple[str, np.ndarray]]
    shared_memory: dict[str, SharedMemoryOutput] | None = None


@dataclass(frozen=True)
class ModelMetadata:
    """A model as clients see it: tensors with the shapes they send (-1: any size, a leading
    -1 for the batch), and the parameters of serving/models/model.py's ``parameters``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class IndexEntry:
    """A row of the repository index: one model version, or a model never loaded."""

    name: str
    version: str
    state: str
    reason: str
