"""The reference line: the same ONNX file on onnxruntime in-process, no server at all."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def raw_onnxruntime(
    model_path: Path, sample: np.ndarray | Mapping[str, np.ndarray],
    batch_sizes=(1, 8, 32), seconds: float = 3.0, threads: int = 0, min_runs: int = 1,
    batched: bool = True,
) -> dict[int, dict[str, float]]:
    """Inferences/s and p50 latency (ms) of back-to-back runs at each batch size: each
    batch size runs for ``seconds`` and at least ``min_runs`` times after 3 warm-up runs.

    ``sample``: one sample of the first input, or of each input by name (without the batch
    dimension; repeated to each batch size). ``threads``: onnxruntime's intra-op threads (0:
    its default, one per core). ``batched`` false: the model has no batch dimension, the
    sample is fed as it is, and ``batch_sizes`` must be (1,).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    samples = (dict(sample) if isinstance(sample, Mapping)
               else {session.get_inputs()[0].name: sample})
    if not batched and tuple(batch_sizes) != (1,):
        raise ValueError(f"a model without a batch dimension runs at batch size 1 only, not "
                         f"{tuple(batch_sizes)}")
    results = {}
    for batch in batch_sizes:
        feed = ({name: np.repeat(x[np.newaxis], batch, axis=0) for name, x in samples.items()}
                if batched else samples)
        for _ in range(3):
            session.run(None, feed)
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < min_runs:
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        results[batch] = {"throughput": batch * len(times) / sum(times),
                          "p50_ms": float(np.median(times) * 1e3)}
    return results
