"""Run ONNX models with onnxruntime: session creation, the I/O signature, and execution.

The instance knows nothing of protobuf or gRPC: it takes and returns numpy arrays.
``run`` is synchronous and called from worker threads (onnxruntime releases the GIL).

With I/O binding (the default on a GPU) a batch goes to the device in one copy from its
host buffer (pinned, see serving/runtime/pinned.py), the outputs stay on the device, and only the
outputs asked for come back; a classification's top-k runs on the device too, so k
numbers per sample cross back instead of the whole score vector.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, cast

import numpy as np
import onnxruntime as ort

from onnxserve.serving.errors import (
    InferenceFailedError,
    InvalidInputError,
    ModelLoadError,
    UnavailableError,
)
from onnxserve.serving.runtime.devices import CPU_DEVICE, Device
from onnxserve.serving.runtime.pinned import host_buffer
from onnxserve.serving.runtime.providers import check_active, provider_chain
from onnxserve.serving.runtime.sessions import GpuSettings, SessionSettings
from onnxserve.serving.runtime.topk import best_k
from onnxserve.serving.types import Signature, TensorSpec, TopK

KERNELS = Path(__file__).resolve().parent / "kernels"
#: onnxruntime element types the top-k graph exists for
_TOPK_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
               "tensor(double)": "float64"}

log = logging.getLogger(__name__)

_ORT_INVALID_ARGUMENT = ort.capi.onnxruntime_pybind11_state.InvalidArgument

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


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which is not supported")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


def session_signature(session: ort.InferenceSession) -> Signature:
    """The inputs and outputs ``session``'s ONNX file declares (-1: a dimension of no fixed
    size).

    Raises:
        ModelLoadError: a tensor of a type no KServe V2 datatype carries.
    """
    return Signature(inputs=tuple(_spec(a) for a in session.get_inputs()),
                     outputs=tuple(_spec(a) for a in session.get_outputs()))


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


class SessionInstance:
    """One onnxruntime session for one model version, on one device."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_name: str,
        providers: str = "auto",
        settings: SessionSettings | None = None,
        device: Device = CPU_DEVICE,
        gpu: GpuSettings | None = None,
    ) -> None:
        self.settings = settings or SessionSettings()
        self.device = device
        self._model_name = model_name
        gpu = gpu or GpuSettings()
        options = session_options(self.settings)
        try:
            chain = provider_chain(device, gpu, ort.get_available_providers())
            for _name, provider_options in chain:
                cache = provider_options.get("trt_engine_cache_path")
                if cache:
                    Path(cache).mkdir(parents=True, exist_ok=True)
            self._chain = chain
            # No onnxruntime fallback: after a failure it retries on CUDA without the
            # device id or options, or on the CPU, and says so only on stdout.
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=chain, enable_fallback=0
            )
            self.provider = check_active(
                providers, [name for name, _ in chain], self._session.get_providers(),
                model_name,
            )
            _check_device(self._session, self.provider, device, model_name)
        except ModelLoadError:
            raise
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"cannot load {model_path}: {exc}") from exc
        self.signature = session_signature(self._session)
        on_gpu = self.provider != "CPUExecutionProvider"
        self.io_binding = gpu.io_binding if gpu.io_binding is not None else on_gpu
        #: where bound outputs live: onnxruntime's device name and id
        self._output_device = ("cuda", device.id) if on_gpu else ("cpu", 0)
        #: outputs that only the host can hold (strings)
        self._host_outputs = {o.name for o in self.signature.outputs if o.datatype == "BYTES"}
        self._pinned = on_gpu
        self._topk: dict[str, ort.InferenceSession] = {}

    def close(self) -> None:
        """Release the onnxruntime sessions (this instance's and its top-k graphs'): their
        weights, memory arena and thread pools go now, not when the last reference to the
        instance goes (a traceback or a finished task's frame can hold one until Python's
        cyclic garbage collector runs, and a server reloading a model every few seconds
        kept every retired version's threads and memory until then). Call it once no batch
        runs on the instance (its scheduler closed); calling it again does nothing.
        Afterwards a run raises UnavailableError, naming the model.
        """
        closed = cast(ort.InferenceSession, _ClosedSession(self._model_name))
        self._session = closed
        self._topk.clear()

    def describe(self) -> str:
        """The instance's device, provider and I/O path, for metadata and logs."""
        path = "I/O binding" if self.io_binding else "plain run"
        return f"{self.device.describe()} {self.provider} ({path})"

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer to assemble batches in: pinned when this instance runs on a GPU."""
        return host_buffer(shape, dtype, self._pinned)

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
        """Execute one batch and return the named outputs: all when ``output_names`` is
        None, exactly those named otherwise (as ``run_with_top_k``; none for ``[]``)."""
        names = ([o.name for o in self.signature.outputs] if output_names is None
                 else list(output_names))
        if not names:
            return {}
        if self.io_binding:
            return self.run_with_top_k(inputs, names, {})[0]
        try:
            results = self._session.run(names, inputs)
        except UnavailableError:
            raise
        except Exception as exc:
            raise runtime_error(exc) from exc
        return dict(zip(names, results, strict=True))

    def run_with_top_k(
        self,
        inputs: dict[str, np.ndarray],
        output_names: Sequence[str] | None,
        top_k: dict[str, int],
    ) -> tuple[dict[str, np.ndarray], dict[str, TopK]]:
        """Execute one batch: the named outputs whole, and the ``top_k`` outputs' k best
        classes per sample (rows of the batch's leading dimension)."""
        names = (list(output_names) if output_names is not None
                 else [o.name for o in self.signature.outputs])
        try:
            if self.io_binding and all(a.dtype != object for a in inputs.values()):
                return self._run_bound(inputs, names, top_k)
            wanted = list(dict.fromkeys([*names, *top_k]))
            results = dict(zip(wanted, self._session.run(wanted, inputs), strict=True))
        except (InvalidInputError, UnavailableError):
            raise
        except Exception as exc:
            raise runtime_error(exc) from exc
        best = {name: best_k(_rows(results[name]), k) for name, k in top_k.items()}
        return {name: results[name] for name in names}, best

    def _run_bound(
        self, inputs: dict[str, np.ndarray], names: list[str], top_k: dict[str, int]
    ) -> tuple[dict[str, np.ndarray], dict[str, TopK]]:
        binding = self._session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        wanted = list(dict.fromkeys([*names, *top_k]))
        device, device_id = self._output_device
        for name in wanted:
            if name in self._host_outputs:
                binding.bind_output(name, "cpu", 0)
            else:
                binding.bind_output(name, device, device_id)
        self._session.run_with_iobinding(binding)
        values = dict(zip(wanted, binding.get_outputs(), strict=True))
        outputs = {name: values[name].numpy() for name in names}
        best = {}
        for name, k in top_k.items():
            value = values[name]
            if name in outputs or not self._topk_fits(value):
                scores = outputs[name] if name in outputs else value.numpy()
                best[name] = best_k(_rows(scores), k)
            else:
                best[name] = self._top_k_bound(value, k)
        return outputs, best

    def _topk_fits(self, value: ort.OrtValue) -> bool:
        return len(value.shape()) == 2 and value.data_type() in _TOPK_TYPES

    def _top_k_bound(self, value: ort.OrtValue, k: int) -> TopK:
        """Top-k of a [batch, classes] output where it lies; only the k best come back."""
        k = min(k, value.shape()[1])
        if k < 1:
            raise InvalidInputError(f"classification count must be >= 1, got {k}")
        element = value.data_type()
        session = self._topk.get(element)
        if session is None:
            model = KERNELS / f"topk_{_TOPK_TYPES[element]}.onnx"
            chain = [(n, o) for n, o in self._chain if n != "TensorrtExecutionProvider"]
            session = self._topk[element] = ort.InferenceSession(
                str(model), sess_options=session_options(self.settings), providers=chain,
                enable_fallback=0)
        binding = session.io_binding()
        binding.bind_ortvalue_input("scores", value)
        binding.bind_cpu_input("k", np.array([k], dtype=np.int64))
        device, device_id = self._output_device
        binding.bind_output("values", device, device_id)
        binding.bind_output("indices", device, device_id)
        session.run_with_iobinding(binding)
        values, indices = binding.copy_outputs_to_cpu()
        return TopK(values, indices, value.shape()[1])


class _ClosedSession:
    """Stands for the session of a closed instance: any use is refused, naming the model."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):  # protocols probed by copy, pickle, hasattr: absent
            raise AttributeError(name)
        raise UnavailableError(f"model {self._model_name!r}: this instance was closed (the "
                               "model version was unloaded or replaced)")


def runtime_error(exc: Exception) -> InvalidInputError | InferenceFailedError:
    """The serving error for an exception onnxruntime raised while running a batch.

    onnxruntime's INVALID_ARGUMENT status (its ``InvalidArgument`` exception) means the
    inputs cannot be computed: an image smaller than a convolution's kernel, an index out
    of range. That is the request's fault (INVALID_ARGUMENT), not the server's; every other
    failure is the model's or the runtime's (INTERNAL).
    """
    if isinstance(exc, _ORT_INVALID_ARGUMENT):
        text = str(exc).replace("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ", "")
        return InvalidInputError(f"the model cannot compute this input: {text}")
    return InferenceFailedError(f"onnxruntime failed: {exc}")


def _check_device(session: ort.InferenceSession, provider: str, device: Device,
                  model: str) -> None:
    """A GPU session must be on its instance's GPU (not a default device)."""
    if not device.is_gpu or provider == "CPUExecutionProvider":
        return
    options = session.get_provider_options().get(provider, {})
    if options.get("device_id", "0") != str(device.id):
        raise ModelLoadError(
            f"model {model!r}: the instance for GPU {device.id} started on device "
            f"{options.get('device_id')!r} of {provider}")


def _rows(scores: np.ndarray) -> np.ndarray:
    """A batch's scores as [samples, classes]."""
    return scores.reshape(scores.shape[0], -1)
