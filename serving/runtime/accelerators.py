"""GPU options of a model, from config.pbtxt as Triton's onnxruntime backend reads them.

- ``optimization.execution_accelerators.gpu_execution_accelerator``: ``name: "cuda"`` with
  CUDA execution provider options as parameters, and ``name: "tensorrt"`` with Triton's
  TensorRT keys (``precision_mode``, ``max_workspace_size_bytes``, ``trt_*``).
- the older top-level ``parameters`` ``cudnn_conv_algo_search`` (0 exhaustive, 1 heuristic,
  2 default), ``gpu_mem_limit``, ``arena_extend_strategy`` (0 next power of two, 1 same as
  requested) and ``do_copy_in_default_stream``, which Triton still honours.
- ours: ``onnxserve.io_binding`` (auto: on for GPU instances) and ``onnxserve.batch_buckets``
  (auto: on GPU instances, batches are padded up to a power of two or max_batch_size, so
  only those shapes ever reach cuDNN and all of them are warmed up before the model is
  ready; none: no padding, and the warm-up runs every batch size the scheduler can form;
  or a list such as "1,4,16,32").
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.protos.naming import plain_int
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.runtime.sessions import GpuSettings
from onnxserve.serving.types import ModelOptions

#: CUDA execution provider options a model may set (device_id comes from instance_group)
CUDA_OPTIONS = frozenset({
    "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
    "do_copy_in_default_stream", "cudnn_conv_use_max_workspace", "cudnn_conv1d_pad_to_nc1d",
    "enable_skip_layer_norm_strict_mode", "use_tf32", "prefer_nhwc",
    "use_ep_level_unified_stream", "tunable_op_enable", "tunable_op_tuning_enable",
    "tunable_op_max_tuning_duration_ms", "fuse_conv_bias", "sdpa_kernel",
})
_ALGO_SEARCH = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
_ARENA = {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"}
#: gpu_mem_limit is a size_t
MAX_BYTES = 2**64 - 1
#: Triton's TensorRT keys that are not the TensorRT provider's own trt_* names
_TRT_RENAMED = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}
_PRECISIONS = {"FP32": {}, "FP16": {"trt_fp16_enable": "1"},
               "INT8": {"trt_int8_enable": "1", "trt_fp16_enable": "1"}}


def _cuda_value(key: str, value: str, where: str) -> str:
    if key == "cudnn_conv_algo_search":
        value = _ALGO_SEARCH.get(value, value).upper()
        if value not in _ALGO_SEARCH.values():
            raise ModelLoadError(f"{where} must be EXHAUSTIVE (0), HEURISTIC (1) or "
                                 f"DEFAULT (2), not {value!r}")
    elif key == "arena_extend_strategy":
        value = _ARENA.get(value, value)
        if value not in _ARENA.values():
            raise ModelLoadError(f"{where} must be kNextPowerOfTwo (0) or kSameAsRequested "
                                 f"(1), not {value!r}")
    elif key == "gpu_mem_limit" and plain_int(value, MAX_BYTES) is None:
        raise ModelLoadError(f"{where} must be a number of bytes, not {value!r}")
    return value


def _tensorrt_options(parameters, where: str, cache_dir: Path) -> dict[str, str]:
    options = {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache_dir),
               "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache_dir)}
    for key, value in parameters.items():
        if key == "precision_mode":
            precision = value.upper()
            if precision not in _PRECISIONS:
                raise ModelLoadError(f"{where}: precision_mode must be FP32, FP16 or INT8, "
                                     f"not {value!r}")
            options.update(_PRECISIONS[precision])
        elif key in _TRT_RENAMED:
            options[_TRT_RENAMED[key]] = value
        elif key.startswith("trt_") and key != "trt_cuda_graph_enable":
            options[key] = value
        else:
            raise ModelLoadError(
                f"{where}: unknown TensorRT parameter {key!r}; expected precision_mode, "
                f"{', '.join(_TRT_RENAMED)} or a trt_* option of onnxruntime's TensorRT "
                "provider (CUDA graphs are not supported)")
    return options


def default_cache_dir(model: str) -> Path:
    """Where TensorRT engines of ``model`` are cached unless the config names a path."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxserve" / "tensorrt" / model


def gpu_settings(config: ModelConfig, options: ModelOptions) -> GpuSettings:
    """The model's GPU options (``options``: its parameters, serving/models/options.py),
    checked; errors name the setting and what it takes."""
    where = f"model {config.name!r}"
    if config.optimization.cuda.graphs:
        raise ModelLoadError(f"{where}: optimization.cuda.graphs is not supported; remove it "
                             "(batches are padded to warmed-up bucket sizes instead)")
    cuda = {key: _cuda_value(key, value, f"{where}: parameter {key!r}")
            for key, value in options.legacy_cuda.items()}
    tensorrt = None
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        name = accelerator.name.lower()
        place = f"{where}: gpu_execution_accelerator {accelerator.name!r}"
        if name == "cuda":
            for key, value in accelerator.parameters.items():
                if key not in CUDA_OPTIONS:
                    raise ModelLoadError(
                        f"{place}: unknown option {key!r}; expected one of "
                        f"{', '.join(sorted(CUDA_OPTIONS))} (device_id comes from "
                        "instance_group gpus)")
                cuda[key] = _cuda_value(key, value.strip(), f"{place}: option {key!r}")
        elif name == "tensorrt":
            tensorrt = _tensorrt_options(accelerator.parameters, place,
                                         default_cache_dir(config.name))
        else:
            raise ModelLoadError(f"{place} is not available; expected cuda or tensorrt")
    return GpuSettings(cuda, tensorrt, options.io_binding, options.batch_buckets)


def resolve_buckets(buckets: tuple[int, ...] | None, max_batch_size: int,
                    on_gpu: bool) -> tuple[int, ...]:
    """The bucket sizes a scheduler pads to: () for none.

    ``auto`` means powers of two up to ``max_batch_size`` plus ``max_batch_size`` itself on
    a GPU, and no padding on the CPU (where a padded row costs as much as a real one).
    """
    if max_batch_size <= 0:
        return ()
    if buckets is None:
        if not on_gpu:
            return ()
        sizes = {1 << n for n in range(max_batch_size.bit_length()) if 1 << n <= max_batch_size}
        return tuple(sorted(sizes | {max_batch_size}))
    sizes = {b for b in buckets if b <= max_batch_size}
    return tuple(sorted(sizes | {max_batch_size})) if buckets else ()
