"""Every config.pbtxt ``parameters`` key onnxserve acts on, parsed once per model.

Triton's onnxruntime-backend keys where they exist (``intra_op_thread_count``,
``inter_op_thread_count``, ``execution_mode``, and the older top-level CUDA keys
``cudnn_conv_algo_search``, ``gpu_mem_limit``, ``arena_extend_strategy``,
``do_copy_in_default_stream``), onnxserve's own under ``onnxserve.``. A bad value fails the
model's load with one wording: ``model 'm': parameter 'k' must be ..., not 'v'``. Other
``onnxserve.*`` keys (the exporter's weights, data set, parity, ...) are information for
model metadata and are not read here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from onnxserve.protos.images import (
    BACKGROUND_PARAMETER,
    BACKGROUNDS,
    DEFAULT_BACKGROUND,
    ENCODED_IMAGE_PARAMETER,
    PREPROCESSING_MODES,
    PREPROCESSING_PARAMETER,
)
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.protos.naming import plain_int
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.settings import SPINNING_MODES
from onnxserve.serving.types import RUN_ON_EVENT_LOOP_KEY, ModelOptions

INTRA_OP_KEY = "intra_op_thread_count"
INTER_OP_KEY = "inter_op_thread_count"
EXECUTION_MODE_KEY = "execution_mode"
SPINNING_KEY = "onnxserve.spinning"
IO_BINDING_KEY = "onnxserve.io_binding"
BUCKETS_KEY = "onnxserve.batch_buckets"
#: Triton's older top-level CUDA parameters (values as Triton writes them, checked where
#: the CUDA options are assembled: serving/runtime/accelerators.py)
LEGACY_CUDA_KEYS = ("cudnn_conv_algo_search", "gpu_mem_limit", "arena_extend_strategy",
                    "do_copy_in_default_stream")

#: the largest thread count or batch size a parameter may give (onnxruntime takes int32)
MAX_COUNT = 2**31 - 1

T = TypeVar("T")


class _Reader:
    """Reads one model's parameters, each failure in the one wording."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config

    def text(self, key: str) -> str | None:
        if key not in self._config.parameters:
            return None
        return self._config.parameters[key].string_value.strip()

    def fail(self, key: str, expected: str, value: str) -> ModelLoadError:
        return ModelLoadError(f"model {self._config.name!r}: parameter {key!r} must be "
                              f"{expected}, not {value!r}")

    def parsed(self, key: str, parse: Callable[[str], T | None], expected: str) -> T | None:
        value = self.text(key)
        if value is None:
            return None
        result = parse(value)
        if result is None:
            raise self.fail(key, expected, value)
        return result

    def count(self, key: str) -> int | None:
        return self.parsed(key, lambda v: plain_int(v, MAX_COUNT),
                           f"a whole number >= 0 (ASCII digits, at most {MAX_COUNT})")

    def choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        return self.parsed(key, lambda v: v.lower() if v.lower() in choices else None,
                           f"one of {', '.join(choices)}")

    def tristate(self, key: str) -> bool | None:
        """auto (None), true or false."""
        value = self.choice(key, ("auto", "true", "false"))
        return {"true": True, "false": False}.get(value or "auto")


def _buckets(text: str) -> tuple[int, ...] | None:
    parsed = [plain_int(part.strip(), MAX_COUNT) for part in text.split(",")]
    if any(size is None for size in parsed):
        return None
    sizes = sorted({size for size in parsed if size is not None})
    return tuple(sizes) if sizes and sizes[0] >= 1 else None


def model_options(config: ModelConfig) -> ModelOptions:
    """The model's options from its config's ``parameters``.

    Raises:
        ModelLoadError: a value of the wrong kind, naming the model, the key, what it must
            be and what it is.
    """
    read = _Reader(config)
    mode = read.choice(EXECUTION_MODE_KEY, ("0", "1"))
    buckets_text = (read.text(BUCKETS_KEY) or "auto").lower()
    buckets: tuple[int, ...] | None
    if buckets_text == "auto":
        buckets = None
    elif buckets_text == "none":
        buckets = ()
    else:
        buckets = read.parsed(BUCKETS_KEY, _buckets,
                              "auto, none or batch sizes >= 1 separated by commas")
    image_input = read.text(ENCODED_IMAGE_PARAMETER)
    if image_input == "":
        raise read.fail(ENCODED_IMAGE_PARAMETER, "the name clients send images under", "")
    background = read.choice(BACKGROUND_PARAMETER, tuple(BACKGROUNDS)) or DEFAULT_BACKGROUND
    return ModelOptions(
        intra_op_threads=read.count(INTRA_OP_KEY),
        inter_op_threads=read.count(INTER_OP_KEY),
        parallel_execution=None if mode is None else mode == "1",
        spinning=read.choice(SPINNING_KEY, SPINNING_MODES),
        run_on_event_loop=read.tristate(RUN_ON_EVENT_LOOP_KEY),
        io_binding=read.tristate(IO_BINDING_KEY),
        batch_buckets=buckets,
        legacy_cuda={key: value for key in LEGACY_CUDA_KEYS
                     if (value := read.text(key)) is not None},
        encoded_image_input=image_input,
        preprocessing=(read.parsed(PREPROCESSING_PARAMETER,
                                   lambda v: v if v in PREPROCESSING_MODES else None,
                                   f"one of {', '.join(PREPROCESSING_MODES)}")
                       or "in_graph"),
        image_background=BACKGROUNDS[background],
    )
