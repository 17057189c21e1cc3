"""The reference line: the same ONNX file on onnxruntime in-process, no server at all."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def raw_onnxruntime(
    model_path: Path, sample: np.ndarray, batch_sizes=(1, 8, 32), seconds: float = 3.0,
    threads: int = 0,
) -> dict[int, dict[str, float]]:
    """Inferences/s and p50 latency of back-to-back runs at each batch size."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    results = {}
    for batch in batch_sizes:
        x = np.repeat(sample[np.newaxis], batch, axis=0)
        for _ in range(3):
            session.run(None, {name: x})
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - start)
        results[batch] = {"throughput": batch * len(times) / sum(times),
                          "p50_ms": float(np.median(times) * 1e3)}
    return results
