"""The cheap measurements `onnxserve tune` prunes with, taken before anything is served:
raw onnxruntime's latency per batch size and thread count (benchmarks/raw_onnxruntime.py),
and the per-request cost of a do-nothing KServe V2 server (benchmarks/null_server.py)
measured by the project's own load generator (benchmarks/load.py)."""

from __future__ import annotations

import asyncio
import bisect
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from onnxserve.protos.datatypes import by_config_type
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.process import ServerProcess, free_port

from ..load import build_request, run_load
from ..raw_onnxruntime import raw_onnxruntime
from . import TuneError

#: Concurrency at which the do-nothing server's throughput is measured (requests/s it
#: answers when never idle: its per-request cost is the inverse).
NULL_CONCURRENCY = 4


def model_inputs(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """One sample of each input of ``config`` (a model's config, completed from its ONNX
    file: serving/models/repository.py's complete_config), as clients send it (without the
    batch dimension when the model batches), random_input's values.

    Raises:
        TuneError: an input has a dimension of no fixed size besides the batch one, or is
            not numbers (BYTES).
    """
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in config.input:
        dims = tuple(tensor.dims)
        if any(d < 1 for d in dims):
            raise TuneError(f"input {tensor.name!r} of model {config.name!r} has dims "
                            f"{list(dims)}: tune measures inputs of one fixed shape (only the "
                            "batch dimension may vary)")
        datatype = by_config_type(tensor.data_type)
        if datatype.name == "BYTES":
            raise TuneError(f"input {tensor.name!r} of model {config.name!r} is BYTES; tune "
                            "makes inputs of numbers")
        inputs[tensor.name] = random_input(dims, datatype.numpy, rng)
    return inputs


def random_input(shape: tuple[int, ...], dtype: np.dtype,
                 rng: np.random.Generator) -> np.ndarray:
    """Random values of ``dtype``: uint8 pixels in 0..255, floats in [0, 1), other types 0
    or 1 (a valid index or flag whatever the model does with it)."""
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if np.issubdtype(dtype, np.floating):
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 2, shape).astype(dtype)


@dataclass
class RawProfile:
    """Raw onnxruntime's p50 latency (ms) of one model file per (threads, batch size)."""

    model: str
    latencies_ms: dict[tuple[int, int], float] = field(default_factory=dict)

    def batch_sizes(self, threads: int) -> list[int]:
        return sorted(b for t, b in self.latencies_ms if t == self._measured(threads))

    def _measured(self, threads: int) -> int:
        """``threads``, or the measured thread count nearest to it (the lower on a tie)."""
        counts = sorted({t for t, _ in self.latencies_ms})
        if not counts:
            raise KeyError(f"{self.model}: no raw measurement")
        return min(counts, key=lambda t: (abs(t - threads), t))

    def latency_ms(self, threads: int, batch: int) -> float:
        """The latency of a batch of ``batch`` with ``threads`` threads: measured, or
        interpolated linearly between the measured sizes around it (extrapolated from the
        last two beyond them); a thread count not measured reads the nearest one measured.

        Raises:
            KeyError: nothing was measured.
        """
        threads = self._measured(threads)
        sizes = self.batch_sizes(threads)
        if batch in sizes:
            return self.latencies_ms[threads, batch]
        if len(sizes) == 1:
            return self.latencies_ms[threads, sizes[0]] * batch / sizes[0]
        i = min(max(bisect.bisect_left(sizes, batch), 1), len(sizes) - 1)
        (b0, b1) = sizes[i - 1], sizes[i]
        l0, l1 = self.latencies_ms[threads, b0], self.latencies_ms[threads, b1]
        return max(l0 + (l1 - l0) * (batch - b0) / (b1 - b0), 1e-6)

    def as_dict(self) -> dict:
        return {"model": self.model, "points": [
            {"threads": t, "batch": b, "p50_ms": round(ms, 4)}
            for (t, b), ms in sorted(self.latencies_ms.items())]}


def profile_raw(model: str, model_file: Path, inputs: dict[str, np.ndarray],
                batch_sizes: list[int], thread_counts: list[int],
                seconds: float, batched: bool = True) -> RawProfile:
    """Raw onnxruntime's p50 latency at each batch size and thread count, each run for
    ``seconds`` (at least 5 runs); ``batched`` false: a model without a batch dimension,
    ``inputs`` whole and ``batch_sizes`` [1]."""
    profile = RawProfile(model)
    for threads in thread_counts:
        measured = raw_onnxruntime(model_file, inputs, batch_sizes=batch_sizes,
                                   seconds=seconds, threads=threads, min_runs=5,
                                   batched=batched)
        for batch, figures in measured.items():
            profile.latencies_ms[threads, batch] = figures["p50_ms"]
    return profile


@dataclass(frozen=True)
class TransportCost:
    """A do-nothing server's cost per request, as the load generator sees it."""

    #: p50 round trip of one request at a time (ms)
    round_trip_ms: float
    #: requests/s answered at NULL_CONCURRENCY in flight
    requests_per_s: float

    def as_dict(self) -> dict:
        return {"round_trip_ms": round(self.round_trip_ms, 4),
                "requests_per_s": round(self.requests_per_s, 1)}


def transport_cost(config: ModelConfig, inputs: dict[str, np.ndarray],
                   window_s: float) -> TransportCost:
    """Start benchmarks/null_server.py for ``config`` and measure it at one request in
    flight and at NULL_CONCURRENCY, ``window_s`` s windows.

    Raises:
        TuneError: the do-nothing server did not start.
    """
    batch = {n: x[np.newaxis] for n, x in inputs.items()} if config.max_batch_size > 0 \
        else inputs
    payload = build_request(config.name, batch)
    with tempfile.TemporaryDirectory(prefix="onnxserve-tune-") as tmp:
        config_file = Path(tmp) / "config.pbtxt"
        config_file.write_text(text_format.MessageToString(config))
        port = free_port()
        null = ServerProcess([sys.executable, "-m", "onnxserve.benchmarks.null_server",
                              "--port", str(port), "--model-config", str(config_file)],
                             f"127.0.0.1:{port}", serve=False)
        try:
            try:
                null.wait_ready(60.0)
            except RuntimeError as exc:
                raise TuneError(f"the do-nothing server did not start: {exc}") from None
            figures = [asyncio.run(run_load(null.url, payload, concurrency=c,
                                            warmup_s=min(window_s, 1.0), window_s=window_s,
                                            max_windows=3))
                       for c in (1, NULL_CONCURRENCY)]
        finally:
            null.stop()
    one, many = figures
    return TransportCost(round_trip_ms=one.p50_ms,
                         requests_per_s=many.throughput)
