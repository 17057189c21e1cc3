"""Model options: every config `parameters` key onnxserve reads, parsed once, one wording."""

from __future__ import annotations

import pytest

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.options import ModelOptions, model_options
from onnxserve.serving.models.repository import parse_config


def _config(**parameters: str):
    text = 'name: "m"\n' + "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in parameters.items())
    return parse_config(text, "m/config.pbtxt")


def test_defaults_when_nothing_is_set() -> None:
    assert model_options(_config()) == ModelOptions()


def test_every_key_parsed() -> None:
    options = model_options(_config(**{
        "intra_op_thread_count": "3", "inter_op_thread_count": "2", "execution_mode": "1",
        "onnxserve.spinning": "always", "onnxserve.run_on_event_loop": "false",
        "onnxserve.io_binding": "true", "onnxserve.batch_buckets": "8, 1,4",
        "gpu_mem_limit": "1024", "onnxserve.encoded_image_input": "image_bytes",
        "onnxserve.preprocessing": "tf", "onnxserve.image_background": "white",
        "onnxserve.weights": "anything: information only"}))
    assert options == ModelOptions(
        intra_op_threads=3, inter_op_threads=2, parallel_execution=True, spinning="always",
        run_on_event_loop=False, io_binding=True, batch_buckets=(1, 4, 8),
        legacy_cuda={"gpu_mem_limit": "1024"}, encoded_image_input="image_bytes",
        preprocessing="tf", image_background=255)
    assert model_options(_config(**{"onnxserve.batch_buckets": "none"})).batch_buckets == ()


_COUNT = "a whole number >= 0 (ASCII digits, at most 2147483647)"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("intra_op_thread_count", "two", _COUNT),
    ("inter_op_thread_count", "-1", _COUNT),
    # str.isdigit() takes these, and int() then raised ValueError or read another script
    ("intra_op_thread_count", "\u00b2", _COUNT),
    ("intra_op_thread_count", "\u0663", _COUNT),
    ("intra_op_thread_count", "+3", _COUNT),
    ("inter_op_thread_count", "1_0", _COUNT),
    ("inter_op_thread_count", "2147483648", _COUNT),
    ("onnxserve.batch_buckets", "4,\u0663", "auto, none or batch sizes >= 1 separated by commas"),
    ("onnxserve.batch_buckets", "+4", "auto, none or batch sizes >= 1 separated by commas"),
    ("onnxserve.batch_buckets", "1_6", "auto, none or batch sizes >= 1 separated by commas"),
    ("execution_mode", "2", "one of 0, 1"),
    ("onnxserve.spinning", "sometimes", "one of off, run, always"),
    ("onnxserve.run_on_event_loop", "maybe", "one of auto, true, false"),
    ("onnxserve.io_binding", "sometimes", "one of auto, true, false"),
    ("onnxserve.batch_buckets", "0,4", "auto, none or batch sizes >= 1 separated by commas"),
    ("onnxserve.preprocessing", "imagenet", "one of in_graph, unit, tf, caffe, torch"),
    ("onnxserve.image_background", "grey", "one of black, white"),
    ("onnxserve.encoded_image_input", "", "the name clients send images under"),
])
def test_one_wording_for_every_bad_value(key: str, value: str, expected: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        model_options(_config(**{key: value}))
    assert str(caught.value) == f"model 'm': parameter {key!r} must be {expected}, not {value!r}"
