"""The classification extension's top-k strings."""

from __future__ import annotations

import numpy as np
import pytest

from onnxserve.serving.classification import top_k
from onnxserve.serving.errors import InvalidInputError


def test_best_first_with_labels() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], dtype=np.float32)
    out = top_k(scores, 2, ["a", "b", "c"], batched=True)
    assert out.tolist() == [
        [b"0.700000:1:b", b"0.200000:2:c"],
        [b"0.500000:0:a", b"0.400000:2:c"],
    ]


def test_without_labels_and_k_above_classes() -> None:
    out = top_k(np.array([3.0, 1.0, 2.0]), 10, None, batched=False)
    assert out.tolist() == [b"3.000000:0", b"2.000000:2", b"1.000000:1"]


def test_count_must_be_positive() -> None:
    with pytest.raises(InvalidInputError):
        top_k(np.zeros((1, 3)), 0, None, batched=True)


def test_matches_full_sort_on_random_scores() -> None:
    scores = np.random.default_rng(0).random((4, 1000)).astype(np.float32)
    out = top_k(scores, 5, None, batched=True)
    for row, strings in zip(scores, out, strict=True):
        assert [int(s.split(b":")[1]) for s in strings] == list(np.argsort(-row)[:5])


def test_labels_must_be_one_per_class_when_classes_vary() -> None:
    from onnxserve.serving.classification import class_strings
    from onnxserve.serving.errors import InferenceFailedError
    from onnxserve.serving.runtime.topk import best_k

    best = best_k(np.array([[0.1, 0.7, 0.2]]), 1)
    assert class_strings(best, ["a", "b", "c"], "y").tolist() == [[b"0.700000:1:b"]]
    with pytest.raises(InferenceFailedError, match="output 'y' has 3 classes per sample but "
                                                   "its label file has 4 labels"):
        class_strings(best, ["background", "a", "b", "c"], "y")
    with pytest.raises(InferenceFailedError, match="has 3 classes"):
        top_k(np.array([[0.1, 0.7, 0.2]]), 2, ["a", "b"], batched=True, output="y")
