"""Encoded image input: JPEG/PNG/... files in a BYTES tensor, decoded into the model's input.

A model opts in with the config parameter ``onnxserve.encoded_image_input`` naming a BYTES
input (shape [batch, 1]: one file per sample) that stands for its single image input
(dims [H, W, C] NHWC, or [C, H, W] with ``format: FORMAT_NCHW``). The files are decoded as
protos/images.py decodes them for every client, off the event loop, and batched with the
requests that send pixels.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from onnxserve.protos.datatypes import by_config_type
from onnxserve.protos.images import ENCODED_IMAGE_PARAMETER, ImageError, ImageSpec, decode
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.errors import InvalidInputError, ModelLoadError
from onnxserve.serving.types import ModelOptions

_IMAGE_DTYPES = {"UINT8", "FP16", "FP32", "FP64"}


@dataclass(frozen=True)
class EncodedImageInput:
    """A model's encoded-image input: its name, the input it feeds, and the image spec."""

    name: str
    target: str
    spec: ImageSpec

    def describe(self) -> str:
        s = self.spec
        layout = f"{s.channels}x{s.height}x{s.width}" if s.channels_first else (
            f"{s.height}x{s.width}x{s.channels}")
        return (f"{self.name}: BYTES [-1, 1], one encoded image (JPEG, PNG, ...) per sample, "
                f"decoded into {self.target} ({layout}, preprocessing {s.preprocessing})")


def decode_batch(items: np.ndarray, target: EncodedImageInput) -> np.ndarray:
    """Decode a [batch, 1] BYTES tensor into a batch of the target input."""
    samples = []
    for index, data in enumerate(items.reshape(len(items), -1)[:, 0]):
        try:
            samples.append(decode(data, target.spec))
        except ImageError as exc:
            raise InvalidInputError(f"input {target.name!r}: image {index}: {exc}") from None
    return np.stack(samples)


class ImageDecoder:
    """Decodes encoded-image inputs off the event loop, on one thread per core (Pillow
    releases the GIL while decoding, so they decode in parallel)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                        thread_name_prefix="decode")

    async def decode(self, inputs: dict[str, np.ndarray],
                     images: EncodedImageInput) -> dict[str, np.ndarray]:
        """``inputs`` with the encoded-image input replaced by its decoded batch (the
        input it feeds).

        Raises:
            InvalidInputError: an image cannot be decoded (naming it).
        """
        encoded = inputs.pop(images.name)
        inputs[images.target] = await asyncio.get_running_loop().run_in_executor(
            self._pool, decode_batch, encoded, images)
        return inputs

    def close(self) -> None:
        """Stop the decoders; images still queued are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def encoded_image_input(config: ModelConfig, options: ModelOptions) -> EncodedImageInput | None:
    """The model's encoded-image input from its config and options, or None.

    Raises:
        ModelLoadError: the model cannot take encoded images (not one image input of fixed
            size and a batch dimension), naming what it has.
    """
    name = options.encoded_image_input
    if name is None:
        return None
    where = f"model {config.name!r}: parameter {ENCODED_IMAGE_PARAMETER!r}"
    if any(t.name == name for t in config.input):
        raise ModelLoadError(f"{where}: {name!r} is already one of the model's inputs")
    required = [t for t in config.input if not t.optional]
    if len(required) != 1:
        raise ModelLoadError(f"{where}: the model must have exactly one required input (the "
                             f"image), it has {len(required)}")
    tensor = required[0]
    datatype = by_config_type(tensor.data_type)
    dims = list(tensor.dims)
    channels_first = tensor.format == tensor.FORMAT_NCHW
    if len(dims) != 3 or min(dims) <= 0 or datatype.name not in _IMAGE_DTYPES:
        raise ModelLoadError(f"{where}: input {tensor.name!r} is {datatype.name} {dims}; an "
                             "image input must be UINT8/FP16/FP32/FP64 with fixed dims "
                             "[H, W, C] (or [C, H, W] with format FORMAT_NCHW)")
    height, width, channels = (dims[1], dims[2], dims[0]) if channels_first else dims
    if channels not in (1, 3):
        raise ModelLoadError(f"{where}: input {tensor.name!r} has {channels} channels; "
                             "images have 1 or 3")
    if config.max_batch_size < 1:
        raise ModelLoadError(f"{where}: the model must batch (max_batch_size >= 1)")
    spec = ImageSpec(height, width, channels, datatype.numpy, options.preprocessing,
                     channels_first, options.image_background)
    return EncodedImageInput(name, tensor.name, spec)
