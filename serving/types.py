"""Value types that cross the serving layers.

``TensorSpec`` / ``Signature``: a model's tensors as its ONNX file declares them (the runtime
reads them, the model repository completes configs from them). ``TopK``: a classification
result (found where a batch runs, split per request by the batcher, formatted by the data
plane). ``Instance``: what the batcher needs of a model instance (serving/runtime/instance.py
is one), so that batching does not depend on the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from onnxserve.protos.datatypes import TensorSpec
from onnxserve.protos.images import BACKGROUNDS, DEFAULT_BACKGROUND

__all__ = ["RUN_ON_EVENT_LOOP_KEY", "Instance", "ModelOptions", "OutputValue", "RequestTiming",
           "Signature", "TensorSpec", "TopK"]

#: the config parameter that runs a model's batches on the event loop (models/options.py
#: parses it; the runtime's plan names it in its errors)
RUN_ON_EVENT_LOOP_KEY = "onnxserve.run_on_event_loop"


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs as its ONNX file declares them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class TopK(NamedTuple):
    """The k best scores of each sample, best first, and their flat class indices."""

    values: np.ndarray
    indices: np.ndarray
    #: how many classes each sample was ranked among (the output's elements per sample)
    classes: int

    def rows(self, start: int, stop: int, k: int) -> TopK:
        """Samples ``start:stop`` with their first ``k`` classes."""
        return TopK(self.values[start:stop, :k], self.indices[start:stop, :k], self.classes)


#: what a model run hands back per output: the array, or its top-k classes
OutputValue = np.ndarray | TopK


@dataclass(slots=True)
class RequestTiming:
    """When a traced request passed each point of its way through its batch, as
    time.perf_counter_ns() readings (0: not reached), and the batch it ran in: filled by
    the batching layer for a request that asks (serving/observability/tracing.py)."""

    enqueued_ns: int = 0
    compute_start_ns: int = 0
    input_end_ns: int = 0
    output_start_ns: int = 0
    compute_end_ns: int = 0
    #: samples in the batch, and the requests they came from
    batch_size: int = 0
    batch_requests: int = 0


class Instance(Protocol):
    """One model instance as the batcher uses it (serving/runtime/instance.py's SessionInstance)."""

    provider: str

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's inputs in the form the instance runs (before batching)."""
        ...

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer to assemble batches in."""
        ...

    def run(self, inputs: dict[str, np.ndarray],
            output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One batch: the named outputs (all for None)."""
        ...

    def run_with_top_k(self, inputs: dict[str, np.ndarray], output_names: Sequence[str] | None,
                       top_k: dict[str, int]) -> tuple[dict[str, np.ndarray], dict[str, TopK]]:
        """One batch: the named outputs whole, and the ``top_k`` outputs' k best classes."""
        ...


@dataclass(frozen=True)
class ModelOptions:
    """A model's ``parameters``, typed (parsed by serving/models/options.py, read by the
    runtime's plan and the image decoding). None means "not set: decide by default"."""

    #: onnxruntime intra-op threads per instance
    intra_op_threads: int | None = None
    #: threads for independent branches (with execution_mode 1)
    inter_op_threads: int | None = None
    #: run independent branches in parallel (execution_mode 1) or not (0)
    parallel_execution: bool | None = None
    #: when onnxruntime's pool threads spin: off, run, always
    spinning: str | None = None
    #: run batches on the event loop's thread (None: by the warm-up measurement)
    run_on_event_loop: bool | None = None
    #: bind inputs and outputs explicitly (None: on for GPU instances)
    io_binding: bool | None = None
    #: batch sizes batches are padded up to; () none; None: decided by the device
    batch_buckets: tuple[int, ...] | None = None
    #: Triton's top-level CUDA keys, as written
    legacy_cuda: dict[str, str] = field(default_factory=dict)
    #: the BYTES input under which the model also takes encoded image files
    encoded_image_input: str | None = None
    #: how pixels 0-255 are scaled before they reach the model
    preprocessing: str = "in_graph"
    #: grey level transparent pixels are composited onto
    image_background: int = BACKGROUNDS[DEFAULT_BACKGROUND]
