"""Turn image files into model inputs, driven by the model's metadata.

The input's shape gives the size and channels ([-1, H, W, C] NHWC), its datatype the
element type, and the model parameter ``onnxserve.preprocessing`` the scaling:

- ``in_graph``: the model preprocesses itself; send pixels 0-255 as they are.
- ``unit``: pixels / 255 (the seed's MNIST-style models).
- ``tf``: pixels / 127.5 - 1.  ``caffe``: BGR minus ImageNet means.
  ``torch``: (pixels / 255 - mean) / std with ImageNet's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .client import ModelMetadata

PREPROCESSING_PARAMETER = "onnxserve.preprocessing"
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16, "FP64": np.float64}


class ImageInputError(ValueError):
    """The image cannot be read, or the model does not take images."""


@dataclass(frozen=True)
class ImageSpec:
    input_name: str
    datatype: str
    height: int
    width: int
    channels: int
    preprocessing: str


def image_spec(metadata: ModelMetadata) -> ImageSpec:
    """Read the image input's layout and preprocessing from model metadata."""
    if len(metadata.inputs) != 1:
        raise ImageInputError(f"model {metadata.name!r} has {len(metadata.inputs)} inputs, not 1")
    tensor = metadata.inputs[0]
    shape = tensor.shape[1:] if len(tensor.shape) == 4 else tensor.shape
    if len(shape) != 3 or shape[2] not in (1, 3) or min(shape[:2]) <= 0:
        raise ImageInputError(
            f"model {metadata.name!r} input {tensor.name!r} has shape {list(tensor.shape)}; "
            "expected [batch, height, width, 1 or 3]"
        )
    if tensor.datatype not in _DTYPES:
        raise ImageInputError(
            f"model {metadata.name!r} input datatype {tensor.datatype} is not an image type"
        )
    mode = str(metadata.parameters.get(PREPROCESSING_PARAMETER, "in_graph"))
    return ImageSpec(tensor.name, tensor.datatype, shape[0], shape[1], shape[2], mode)


def _resize_center_crop(image, height: int, width: int):
    from PIL import Image

    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def scale(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Apply a preprocessing mode to HWC pixels in 0-255."""
    x = pixels.astype(np.float32)
    if mode == "in_graph":
        return pixels
    if mode == "unit":
        return x / 255.0
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":
        return x[..., ::-1] - _CAFFE_MEAN_BGR
    if mode == "torch":
        return (x / 255.0 - _TORCH_MEAN) / _TORCH_STD
    raise ImageInputError(f"unknown preprocessing {mode!r}")


def load_image(path: str | Path, spec: ImageSpec) -> np.ndarray:
    """Read an image file as one model input sample [H, W, C] of the input's datatype."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if spec.channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageInputError(f"cannot read image {path}: {exc}") from None
    image = _resize_center_crop(image, spec.height, spec.width)
    pixels = np.asarray(image, dtype=np.uint8).reshape(spec.height, spec.width, spec.channels)
    return scale(pixels, spec.preprocessing).astype(_DTYPES[spec.datatype])
