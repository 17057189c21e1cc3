"""The classification extension: an output's top-k classes as "score:index[:label]" strings.

The numbers (``best_k``) are found where the batch runs, on the model's device when it can
(serving/runner.py); the strings are made here, per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .errors import InferenceFailedError, InvalidInputError


class TopK(NamedTuple):
    """The k best scores of each sample, best first, and their flat class indices."""

    values: np.ndarray
    indices: np.ndarray
    #: how many classes each sample was ranked among (the output's elements per sample)
    classes: int

    def rows(self, start: int, stop: int, k: int) -> TopK:
        """Samples ``start:stop`` with their first ``k`` classes."""
        return TopK(self.values[start:stop, :k], self.indices[start:stop, :k], self.classes)


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


def class_strings(best: TopK, labels: Sequence[str] | None, output: str = "") -> np.ndarray:
    """"score:index[:label]" BYTES elements [samples, k] of a top-k result.

    Raises:
        InferenceFailedError: the labels are not one per class of ``output`` (a label file
            with a line too many would name every class after its neighbour).
    """
    if labels is not None and len(labels) != best.classes:
        raise InferenceFailedError(
            f"output {output!r} has {best.classes} classes per sample but its label file has "
            f"{len(labels)} labels; fix the label file (one line per class)")
    out = np.empty(best.indices.shape, dtype=object)
    for i, j in np.ndindex(best.indices.shape):
        index = int(best.indices[i, j])
        text = f"{float(best.values[i, j]):f}:{index}"
        if labels is not None and 0 <= index < len(labels):
            text += f":{labels[index]}"
        out[i, j] = text.encode("utf-8")
    return out


def top_k(
    scores: np.ndarray, k: int, labels: Sequence[str] | None, *, batched: bool, output: str = ""
) -> np.ndarray:
    """Best-first top-k of each sample's scores as a BYTES array [batch, k] (or [k])."""
    rows = scores.reshape(scores.shape[0], -1) if batched else scores.reshape(1, -1)
    out = class_strings(best_k(rows, k), labels, output)
    return out if batched else out[0]
