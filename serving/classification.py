"""The classification extension: an output's top-k classes as "score:index[:label]" strings.

The numbers (``TopK``) are found where the batch runs, on the model's device when it can
(serving/runtime/instance.py, serving/runtime/topk.py); the strings are made here, per
request, by the data plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxserve.serving.errors import InferenceFailedError
from onnxserve.serving.runtime.topk import best_k
from onnxserve.serving.types import TopK


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
