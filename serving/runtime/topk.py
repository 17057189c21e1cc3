"""The k best classes of each sample: numpy on the host (the device's TopK graphs for GPU
instances are serving/runtime/kernels/, run by the instance)."""

from __future__ import annotations

import numpy as np

from onnxserve.serving.errors import InvalidInputError
from onnxserve.serving.types import TopK


def best_k(rows: np.ndarray, k: int) -> TopK:
    """Best-first top-k of each row of a [samples, classes] array (k is clipped to classes)."""
    if k < 1:
        raise InvalidInputError(f"classification count must be >= 1, got {k}")
    classes = rows.shape[1]
    k = min(k, classes)
    # argpartition finds the k best in O(n); only those k are sorted.
    best = np.argpartition(-rows, k - 1, axis=1)[:, :k] if k < classes else np.tile(
        np.arange(classes), (rows.shape[0], 1)
    )
    picked = np.take_along_axis(rows, best, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return TopK(np.take_along_axis(picked, order, axis=1), np.take_along_axis(best, order, axis=1),
                classes)
