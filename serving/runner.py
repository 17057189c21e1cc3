"""Run ONNX models with onnxruntime: session creation, the I/O signature, and execution.

The runner knows nothing of protobuf or gRPC: it takes and returns numpy arrays.
``run`` is synchronous and called from worker threads (onnxruntime releases the GIL).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InferenceFailedError, InvalidInputError, ModelLoadError
from .execution import SessionSettings
from .providers import check_active, requested_providers

log = logging.getLogger(__name__)

# onnxruntime's element type strings and the protocol datatype of each.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the ONNX file declares it; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which is not supported")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


_GRAPH_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def session_options(settings: SessionSettings) -> ort.SessionOptions:
    """onnxruntime options for one session: threads, spinning, sequential execution."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op
    options.inter_op_num_threads = settings.inter_op
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if settings.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.graph_optimization_level = _GRAPH_LEVELS[settings.optimization]
    spin = "0" if settings.spinning == "off" else "1"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if settings.spinning == "run":
        # Spin between operators during a run, but stop as soon as the run ends.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class Runner:
    """One onnxruntime session for one model version."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_name: str,
        providers: str = "auto",
        settings: SessionSettings | None = None,
    ) -> None:
        self.settings = settings or SessionSettings()
        options = session_options(self.settings)
        try:
            requested = requested_providers(providers, ort.get_available_providers())
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=requested
            )
            self.provider = check_active(
                providers, requested, self._session.get_providers(), model_name
            )
        except ModelLoadError:
            raise
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"cannot load {model_path}: {exc}") from exc
        self.signature = Signature(
            inputs=tuple(_spec(a) for a in self._session.get_inputs()),
            outputs=tuple(_spec(a) for a in self._session.get_outputs()),
        )

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Convert one request's inputs to what onnxruntime takes, before it is batched.

        onnxruntime string tensors hold text: BYTES elements must be UTF-8 and become str
        (onnxruntime would otherwise store the repr of a bytes object).
        """
        for spec in self.signature.inputs:
            array = inputs.get(spec.name)
            if spec.datatype != "BYTES" or array is None:
                continue
            text = np.empty(array.shape, dtype=object)
            try:
                for index, item in np.ndenumerate(array):
                    text[index] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"input {spec.name!r}: element {index} is not UTF-8 text ({exc.reason}); "
                    "this model's string input only takes text"
                ) from None
            inputs = {**inputs, spec.name: text}
        return inputs

    def run(
        self, inputs: dict[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Execute one batch and return the named outputs (all when ``output_names`` is None)."""
        names = list(output_names) if output_names else [o.name for o in self.signature.outputs]
        try:
            results = self._session.run(names, inputs)
        except Exception as exc:
            raise InferenceFailedError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(names, results, strict=True))
