"""Warm-up: run sample batches on every instance before a model reports ready.

The first run of an onnxruntime session allocates its memory arena and, for each new input
shape, plans memory again; on a GPU, cuDNN also searches convolution algorithms per shape.
Warming up moves that cost from the first real requests to load time.

The samples are the config's ``model_warmup`` entries (Triton's format: per input a
``data_type``, ``dims`` without the batch dimension, and ``zero_data``, ``random_data`` or
``input_data_file``, a file of raw little-endian values in the model's ``warmup/`` folder;
``batch_size`` copies, run ``count`` times). Without entries, each batch size the scheduler
can form at its edges (1, each preferred size, and the largest) runs three times on zeros.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxserve.protos import model_config_pb2
from onnxserve.protos.codec import TensorCodecError, decode_raw
from onnxserve.protos.datatypes import Datatype, by_config_type
from onnxserve.serving.batching.assembly import check_output_rows
from onnxserve.serving.errors import InferenceFailedError, InvalidInputError, ModelLoadError
from onnxserve.serving.models.repository import ModelConfig, model_dims
from onnxserve.serving.runtime.instance import SessionInstance

log = logging.getLogger(__name__)

WARMUP_FOLDER = "warmup"
#: outputs a classification can rank (the top-k graph's element types)
_SCORE_TYPES = ("FP16", "FP32", "FP64")
DEFAULT_RUNS = 3


@dataclass(frozen=True)
class WarmupSample:
    """One named batch of inputs and how many times to run it."""

    name: str
    batch_size: int
    inputs: dict[str, np.ndarray]
    count: int


@dataclass(frozen=True)
class WarmupResult:
    """A sample's run times on the first instance: logged at load, and what decides
    whether a model runs on the event loop (``smallest_and_largest``)."""

    name: str
    batch_size: int
    first_s: float
    #: median of the runs after the first (the first when there is only one)
    typical_s: float


def _zeros(datatype_name: str, shape: Sequence[int], numpy_dtype: np.dtype) -> np.ndarray:
    if datatype_name == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=numpy_dtype)


def _random(datatype_name: str, shape: Sequence[int], numpy_dtype: np.dtype,
            rng: np.random.Generator) -> np.ndarray:
    if datatype_name == "BYTES":
        return np.full(shape, b"", dtype=object)
    if datatype_name == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if numpy_dtype.kind in "iu":
        info = np.iinfo(numpy_dtype)
        return rng.integers(max(info.min, 0), min(info.max, 255), shape, endpoint=True,
                            dtype=numpy_dtype)
    return rng.random(shape).astype(numpy_dtype)


def _file_data(model_dir: Path, filename: str, datatype: Datatype, dims: list[int],
               where: str) -> np.ndarray:
    folder = (model_dir / WARMUP_FOLDER).resolve()
    path = (folder / filename).resolve()
    if folder not in path.parents:
        raise ModelLoadError(f"{where}: input_data_file {filename!r} points outside "
                             f"{model_dir / WARMUP_FOLDER}")
    if not path.is_file():
        raise ModelLoadError(f"{where}: input_data_file {path} does not exist")
    try:
        return decode_raw(path.read_bytes(), datatype, dims)
    except TensorCodecError as exc:
        raise ModelLoadError(f"{where}: input_data_file {path}: {exc}") from None


def samples_from_config(config: ModelConfig, model_dir: Path) -> list[WarmupSample]:
    """The config's model_warmup entries as input arrays, checked against the config's inputs."""
    declared = {t.name: t for t in config.input}
    batched = config.max_batch_size > 0
    rng = np.random.default_rng(0)
    samples = []
    for index, entry in enumerate(config.model_warmup):
        where = f"model {config.name!r} model_warmup {entry.name or index!r}"
        if batched and not 1 <= entry.batch_size <= config.max_batch_size:
            raise ModelLoadError(f"{where}: batch_size must be 1..{config.max_batch_size} "
                                 f"(max_batch_size), not {entry.batch_size}")
        unknown = sorted(set(entry.inputs) - set(declared))
        if unknown:
            raise ModelLoadError(f"{where}: unknown input(s) {', '.join(unknown)}; the model's "
                                 f"inputs are {', '.join(declared)}")
        missing = [n for n, t in declared.items() if n not in entry.inputs and not t.optional]
        if missing:
            raise ModelLoadError(f"{where}: no data for input(s) {', '.join(missing)}")
        inputs: dict[str, np.ndarray] = {}
        for name, spec in entry.inputs.items():
            here = f"{where} input {name!r}"
            if spec.data_type != declared[name].data_type:
                raise ModelLoadError(
                    f"{here}: data_type {_type_name(spec.data_type)} but the input is "
                    f"{_type_name(declared[name].data_type)}")
            dims = list(spec.dims)
            if any(d < 0 for d in dims):
                raise ModelLoadError(f"{here}: dims {dims} must be fixed sizes (no -1)")
            expected = list(declared[name].dims)
            if len(dims) != len(expected) or any(
                    e >= 0 and e != d for e, d in zip(expected, dims, strict=True)):
                raise ModelLoadError(f"{here}: dims {dims} do not fit the input's dims "
                                     f"{expected}")
            datatype = by_config_type(spec.data_type)
            kind = spec.WhichOneof("input_data_type")
            if kind == "input_data_file":
                one = _file_data(model_dir, spec.input_data_file, datatype, dims, here)
            elif kind == "random_data":
                one = _random(datatype.name, dims, datatype.numpy, rng)
            else:
                one = _zeros(datatype.name, dims, datatype.numpy)
            # entries give the clients' dims; the model may take them reshaped
            one = one.reshape(model_dims(declared[name]))
            inputs[name] = np.repeat(one[np.newaxis], entry.batch_size, axis=0) if batched \
                else one
        samples.append(WarmupSample(entry.name or f"warmup {index}",
                                    entry.batch_size if batched else 0, inputs,
                                    max(entry.count, 1)))
    return samples


def _type_name(config_type: int) -> str:
    return model_config_pb2.DataType.Name(config_type)


def default_samples(config: ModelConfig,
                    sizes: Sequence[int] | None = None) -> list[WarmupSample]:
    """Zeros at each of ``sizes``; by default batch 1, each preferred batch size and the
    largest batch (or unbatched)."""
    inputs = [t for t in config.input if not t.optional]
    if any(d < 0 for t in inputs for d in model_dims(t)):
        log.info("model %s: no default warm-up (an input has a variable dimension); add "
                 "model_warmup to its config", config.name)
        return []
    if sizes and config.max_batch_size > 0:
        sizes = sorted(set(sizes))
    elif config.max_batch_size > 0:
        preferred = config.dynamic_batching.preferred_batch_size
        sizes = sorted({1, config.max_batch_size,
                        *(p for p in preferred if 0 < p <= config.max_batch_size)})
    else:
        sizes = [0]
    samples = []
    for size in sizes:
        arrays = {}
        for tensor in inputs:
            datatype = by_config_type(tensor.data_type)
            shape = [size, *model_dims(tensor)] if size else model_dims(tensor)
            arrays[tensor.name] = _zeros(datatype.name, shape, datatype.numpy)
        samples.append(WarmupSample(f"batch {size}" if size else "default", size, arrays,
                                    DEFAULT_RUNS))
    return samples


def warm_up(instances: Sequence[SessionInstance], samples: Sequence[WarmupSample],
            where: str) -> list[WarmupResult]:
    """Run every sample on every instance; return the timings of the first instance.

    A sample the model cannot run is a load error naming the sample.
    """
    results = []
    for sample in samples:
        for number, instance in enumerate(instances):
            timings = []
            try:
                prepared = instance.prepare(sample.inputs)
                for _ in range(sample.count):
                    started = time.perf_counter()
                    outputs = instance.run(prepared)
                    timings.append(time.perf_counter() - started)
                    if sample.batch_size:
                        # A model that returns other row counts than it is given cannot
                        # batch: refuse it now rather than at its first batched request.
                        check_output_rows("", sample.batch_size, 1, outputs)
                if instance.io_binding and sample.batch_size:
                    # the classification extension's top-k graph, at this batch shape too
                    classes = {o.name: 1 for o in instance.signature.outputs
                               if len(o.shape) == 2 and o.datatype in _SCORE_TYPES}
                    if classes:
                        _, best = instance.run_with_top_k(prepared, [], classes)
                        check_output_rows("", sample.batch_size, 1, {}, best)
            except (InferenceFailedError, InvalidInputError) as exc:
                raise ModelLoadError(f"{where}: warm-up {sample.name!r} failed: {exc}") from None
            if number == 0:
                later = timings[1:] or timings
                results.append(WarmupResult(sample.name, sample.batch_size, timings[0],
                                            statistics.median(later)))
    return results


def smallest_and_largest(results: Sequence[WarmupResult]) -> tuple[float | None, float | None]:
    """Typical run times of the smallest and the largest warmed-up batch (None: none ran)."""
    if not results:
        return None, None
    ordered = sorted(results, key=lambda r: r.batch_size)
    return ordered[0].typical_s, ordered[-1].typical_s

