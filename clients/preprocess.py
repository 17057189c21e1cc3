"""Turn image files into model inputs, driven by the model's metadata.

The input's shape gives the size and channels ([-1, H, W, C] NHWC), its datatype the
element type, and the model parameter ``onnxserve.preprocessing`` the scaling:

- ``in_graph``: the model preprocesses itself; send pixels 0-255 as they are.
- ``unit``: pixels / 255 (the seed's MNIST-style models).
- ``tf``: pixels / 127.5 - 1.  ``caffe``: BGR minus ImageNet means.
  ``torch``: (pixels / 255 - mean) / std with ImageNet's mean and std.

Decoding, resizing and scaling are the server's own functions (protos/images.py), so an
image preprocessed here and one the server decodes give the model the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxserve.protos import images

from .client import ModelMetadata

PREPROCESSING_PARAMETER = images.PREPROCESSING_PARAMETER
#: model metadata parameter present when the server decodes images itself
ENCODED_IMAGE_PARAMETER = "encoded_image_input"
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
    #: the BYTES input the server decodes files from, when it offers one
    encoded_input: str | None = None
    #: grey level transparent pixels are composited onto (the model's image_background)
    background: int = images.BACKGROUNDS[images.DEFAULT_BACKGROUND]

    def sample_spec(self) -> images.ImageSpec:
        """The decoding spec for one sample (the same one the server uses)."""
        return images.ImageSpec(self.height, self.width, self.channels,
                                np.dtype(_DTYPES[self.datatype]), self.preprocessing,
                                background=self.background)


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
    encoded = metadata.parameters.get(ENCODED_IMAGE_PARAMETER)
    encoded_name = str(encoded).split(":", 1)[0] if encoded else None
    try:
        background = images.background_level(
            str(metadata.parameters.get(images.BACKGROUND_PARAMETER, "")))
    except images.ImageError as exc:
        raise ImageInputError(str(exc)) from None
    return ImageSpec(tensor.name, tensor.datatype, shape[0], shape[1], shape[2], mode,
                     encoded_name, background)


def load_image(path: str | Path, spec: ImageSpec) -> np.ndarray:
    """Read an image file as one model input sample [H, W, C] of the input's datatype."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageInputError(f"cannot read image {path}: {exc}") from None
    try:
        return images.decode(data, spec.sample_spec())
    except images.ImageError as exc:
        raise ImageInputError(f"{path}: {exc}") from None
