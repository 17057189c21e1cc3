"""Request checks against the model config: names, datatypes, shapes, batch sizes."""

from __future__ import annotations

import pytest

from onnxserve.protos import model_config_pb2 as mc
from onnxserve.serving.errors import InvalidInputError
from onnxserve.serving.models.validation import CHECKED_LIMIT, InputRules


def check_inputs(config: mc.ModelConfig, declared) -> int:
    return InputRules(config).check(declared)


def check_outputs(config: mc.ModelConfig, names) -> list[str]:
    return InputRules(config).check_outputs(names)


@pytest.fixture
def config() -> mc.ModelConfig:
    c = mc.ModelConfig(name="m", max_batch_size=8)
    c.input.add(name="image", data_type=mc.TYPE_FP32, dims=[28, 28, 1])
    c.input.add(name="mask", data_type=mc.TYPE_UINT8, dims=[-1])
    c.output.add(name="probs", data_type=mc.TYPE_FP32, dims=[10])
    return c


def test_valid_request_returns_batch_size(config: mc.ModelConfig) -> None:
    assert check_inputs(config, [("image", "FP32", (3, 28, 28, 1)), ("mask", "UINT8", (3, 7))]) == 3


BAD_INPUTS = [
    ([("img", "FP32", (1, 28, 28, 1))], "has no input 'img'; its inputs are image, mask"),
    ([("image", "FP64", (1, 28, 28, 1)), ("mask", "UINT8", (1, 1))],
     "input 'image': expected datatype FP32, got 'FP64'"),
    ([("image", "FP32", (28, 28, 1)), ("mask", "UINT8", (1, 1))],
     r"input 'image': expected shape \[-1, 28, 28, 1\], got \[28, 28, 1\]"),
    ([("image", "FP32", (9, 28, 28, 1)), ("mask", "UINT8", (9, 1))], "outside 1..8"),
    ([("image", "FP32", (0, 28, 28, 1)), ("mask", "UINT8", (0, 1))], "outside 1..8"),
    ([("image", "FP32", (1, 28, 28, 1))], "needs input\\(s\\) mask"),
    ([("image", "FP32", (1, 28, 28, 1)), ("image", "FP32", (1, 28, 28, 1))], "more than once"),
    ([("image", "FP32", (1, 28, 28, 1)), ("mask", "UINT8", (2, 1))], "disagree on the batch"),
    ([("image", "FP32", (1, -28, 28, 1)), ("mask", "UINT8", (1, 1))], "expected shape"),
    ([("image", "FP32", (1, 28, 28, 1)), ("mask", "UINT8", (1, 0))],
     r"input 'mask': shape \[1, 0\] has an empty variable dimension \(index 1\)"),
]


@pytest.mark.parametrize(("declared", "message"), BAD_INPUTS)
def test_bad_inputs(config: mc.ModelConfig, declared, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        check_inputs(config, declared)


def test_unbatched_model_takes_exact_dims(config: mc.ModelConfig) -> None:
    config.max_batch_size = 0
    assert check_inputs(config, [("image", "FP32", (28, 28, 1)), ("mask", "UINT8", (4,))]) == 0


def test_outputs(config: mc.ModelConfig) -> None:
    assert check_outputs(config, []) == ["probs"]
    assert check_outputs(config, ["probs"]) == ["probs"]
    with pytest.raises(InvalidInputError, match="has no output 'logits'"):
        check_outputs(config, ["logits"])


def test_rules_that_passed_a_declaration_still_check_every_other(config: mc.ModelConfig) -> None:
    """InputRules keeps the declarations that passed (the same few recur): one instance,
    used request after request, answers each as a fresh one would, and keeps at most
    CHECKED_LIMIT of them."""
    rules = InputRules(config)
    for _ in range(2):
        for batch in (1, 3, 8):
            assert rules.check([("image", "FP32", (batch, 28, 28, 1)),
                                ("mask", "UINT8", (batch, 5))]) == batch
        for declared, message in BAD_INPUTS:
            with pytest.raises(InvalidInputError, match=message):
                rules.check(declared)
    for width in range(1, 3 * CHECKED_LIMIT):
        assert rules.check([("image", "FP32", (2, 28, 28, 1)), ("mask", "UINT8", (2, width))]) == 2
    assert len(rules._passed) <= CHECKED_LIMIT
