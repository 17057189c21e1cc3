"""The classification extension: an output's top-k classes as "score:index[:label]" strings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidInputError


def top_k(
    scores: np.ndarray, k: int, labels: Sequence[str] | None, *, batched: bool
) -> np.ndarray:
    """Best-first top-k of each sample's scores as a BYTES array [batch, k] (or [k])."""
    rows = scores.reshape(scores.shape[0], -1) if batched else scores.reshape(1, -1)
    classes = rows.shape[1]
    if k < 1:
        raise InvalidInputError(f"classification count must be >= 1, got {k}")
    k = min(k, classes)
    # argpartition finds the k best in O(n); only those k are sorted.
    best = np.argpartition(-rows, k - 1, axis=1)[:, :k] if k < classes else np.tile(
        np.arange(classes), (rows.shape[0], 1)
    )
    picked = np.take_along_axis(rows, best, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    best = np.take_along_axis(best, order, axis=1)
    picked = np.take_along_axis(picked, order, axis=1)
    out = np.empty(best.shape, dtype=object)
    for i, j in np.ndindex(best.shape):
        index = int(best[i, j])
        text = f"{float(picked[i, j]):f}:{index}"
        if labels is not None and index < len(labels):
            text += f":{labels[index]}"
        out[i, j] = text.encode("utf-8")
    return out if batched else out[0]
