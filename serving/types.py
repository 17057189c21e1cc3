"""Value types that cross the serving layers.

``TensorSpec`` / ``Signature``: a model's tensors as its ONNX file declares them (the runtime
reads them, the model repository completes configs from them). ``TopK``: a classification
result (found where a batch runs, split per request by the batcher, formatted by the data
plane). ``Instance``: what the batcher needs of a model instance (serving/runtime/instance.py
is one), so that batching does not depend on the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from onnxserve.protos.datatypes import TensorSpec

__all__ = ["Instance", "OutputValue", "Signature", "TensorSpec", "TopK"]


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
