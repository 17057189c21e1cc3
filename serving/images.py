"""Encoded image input: JPEG/PNG/... files in a BYTES tensor, decoded into the model's input.

A model opts in with the config parameter ``onnxserve.encoded_image_input`` naming a BYTES
input (shape [batch, 1]: one file per sample) that stands for its single image input
(dims [H, W, C] NHWC, or [C, H, W] with ``format: FORMAT_NCHW``). Each file is decoded with
Pillow (JPEG in draft mode: the decoder itself scales down by up to 8x when the photo is
much larger than the input), then made into the picture a viewer shows, at 8 bits per
channel (see ``to_sample``), resized so it covers H x W and centre-cropped, converted to
RGB or greyscale, and scaled per the model's ``onnxserve.preprocessing`` parameter
(``in_graph``: pixels as they are). Clients that preprocess themselves use the same
functions, so both paths give the model the same numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from onnxserve.protos.datatypes import by_config_type

from .errors import InvalidInputError, ModelLoadError

if TYPE_CHECKING:
    from PIL import Image

    from onnxserve.protos.model_config_pb2 import ModelConfig

ENCODED_IMAGE_PARAMETER = "onnxserve.encoded_image_input"
PREPROCESSING_PARAMETER = "onnxserve.preprocessing"
PREPROCESSING_MODES = ("in_graph", "unit", "tf", "caffe", "torch")
#: what transparent pixels are composited onto: "black" (the default) or "white"
BACKGROUND_PARAMETER = "onnxserve.image_background"
BACKGROUNDS = {"black": 0, "white": 255}
DEFAULT_BACKGROUND = "black"
#: EXIF tag 0x0112: how the stored pixels must be turned to show the picture upright
_EXIF_ORIENTATION = 0x0112
#: orientations that swap width and height (the transposing and 90-degree ones)
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
#: Pillow modes of 16-bit single-channel pixels (PNG, TIFF, PGM, ...)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
#: Larger images are refused before decoding (a small file can decode to gigabytes).
MAX_PIXELS = 40_000_000

_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_IMAGE_DTYPES = {"UINT8", "FP16", "FP32", "FP64"}


class ImageError(ValueError):
    """An image cannot be decoded or turned into the model's input."""


@dataclass(frozen=True)
class ImageSpec:
    """How to turn one image into one sample of a model's image input."""

    height: int
    width: int
    channels: int
    dtype: np.dtype
    preprocessing: str = "in_graph"
    channels_first: bool = False
    #: grey level (0-255) that transparent pixels are composited onto
    background: int = BACKGROUNDS[DEFAULT_BACKGROUND]


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


def scale(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Apply a preprocessing mode to HWC pixels in 0-255."""
    if mode == "in_graph":
        return pixels
    x = pixels.astype(np.float32)
    if mode == "unit":
        return x / 255.0
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":
        return x[..., ::-1] - _CAFFE_MEAN_BGR
    if mode == "torch":
        return (x / 255.0 - _TORCH_MEAN) / _TORCH_STD
    raise ImageError(f"unknown preprocessing {mode!r}; expected one of "
                     f"{', '.join(PREPROCESSING_MODES)}")


def resize_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale a PIL image to cover height x width, then cut the centre."""
    from PIL import Image

    if image.size == (width, height):
        return image
    factor = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * factor)), max(height, round(image.height * factor)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def upright(image: Image.Image) -> Image.Image:
    """The image turned the way its EXIF orientation tag says (phones store photos sideways
    and tag them; every viewer turns them upright)."""
    from PIL import ImageOps

    if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def eight_bit(image: Image.Image) -> Image.Image:
    """The image at 8 bits per channel, the same picture.

    16-bit pixels are scaled by their bit depth (v * 255 / 65535, rounded), not clipped at
    255 as Pillow's own conversion does. 32-bit integer (mode I) and floating-point (mode F)
    pixels have no agreed range to scale from and are refused, except mode I from a PNG,
    which can only hold 16-bit values (older Pillow releases open 16-bit PNGs that way).

    Raises:
        ImageError: for mode I (other than PNG) and F images, naming the mode.
    """
    from PIL import Image

    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise ImageError(f"the image has {kind} pixels (Pillow mode {mode}), which have no "
                         "agreed 8-bit range; save it with 8 or 16 bits per channel")
    return image


def flatten_alpha(image: Image.Image, background: int) -> Image.Image:
    """Transparent pixels composited onto a grey ``background`` (0-255), alpha removed.

    Dropping alpha instead would show the colour stored under transparent pixels: a white
    digit drawn on transparent white would become a white square.
    """
    from PIL import Image

    if not image.has_transparency_data:
        return image
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_sample(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One opened PIL image as one model input sample: upright (EXIF orientation), at 8 bits
    per channel, transparency composited onto the spec's background, converted to RGB or
    greyscale, resized to cover the input and centre-cropped, then scaled.

    Raises:
        ImageError: for pixel modes that cannot be shown at 8 bits (see ``eight_bit``).
    """
    image = flatten_alpha(eight_bit(upright(image)), spec.background)
    image = image.convert("L" if spec.channels == 1 else "RGB")
    image = resize_center_crop(image, spec.height, spec.width)
    pixels = np.asarray(image, dtype=np.uint8).reshape(spec.height, spec.width, spec.channels)
    sample = scale(pixels, spec.preprocessing).astype(spec.dtype, copy=False)
    return np.ascontiguousarray(sample.transpose(2, 0, 1)) if spec.channels_first else sample


def decode(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode one encoded image into one sample (see ``to_sample``); ImageError says why it
    cannot."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise ImageError(f"the image is {opened.width}x{opened.height} pixels; at most "
                                 f"{MAX_PIXELS:,} are accepted")
            # JPEG only: let the decoder scale down while it decodes (at least our size,
            # measured the way the stored pixels lie, before they are turned upright).
            size = (spec.width, spec.height)
            if opened.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPPING_ORIENTATIONS:
                size = (spec.height, spec.width)
            opened.draft("RGB" if spec.channels == 3 else "L", size)
            return to_sample(opened, spec)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("cannot decode the image: not a format Pillow reads (JPEG, PNG, "
                         "...)") from None
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageError(f"cannot decode the image: {exc}") from None


def decode_batch(items: np.ndarray, target: EncodedImageInput) -> np.ndarray:
    """Decode a [batch, 1] BYTES tensor into a batch of the target input."""
    samples = []
    for index, data in enumerate(items.reshape(len(items), -1)[:, 0]):
        try:
            samples.append(decode(data, target.spec))
        except ImageError as exc:
            raise InvalidInputError(f"input {target.name!r}: image {index}: {exc}") from None
    return np.stack(samples)


def encoded_image_input(config: ModelConfig) -> EncodedImageInput | None:
    """The model's encoded-image input from its config, or None; ModelLoadError if unusable."""
    if ENCODED_IMAGE_PARAMETER not in config.parameters:
        return None
    name = config.parameters[ENCODED_IMAGE_PARAMETER].string_value.strip()
    where = f"model {config.name!r}: parameter {ENCODED_IMAGE_PARAMETER!r}"
    if not name:
        raise ModelLoadError(f"{where} is empty; expected the name clients send images under")
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
    mode = "in_graph"
    if PREPROCESSING_PARAMETER in config.parameters:
        mode = config.parameters[PREPROCESSING_PARAMETER].string_value.strip()
        if mode not in PREPROCESSING_MODES:
            raise ModelLoadError(f"model {config.name!r}: parameter "
                                 f"{PREPROCESSING_PARAMETER!r} is {mode!r}; expected one of "
                                 f"{', '.join(PREPROCESSING_MODES)}")
    background = background_level(config.parameters[BACKGROUND_PARAMETER].string_value
                                  if BACKGROUND_PARAMETER in config.parameters else "",
                                  f"model {config.name!r}")
    spec = ImageSpec(height, width, channels, datatype.numpy, mode, channels_first, background)
    return EncodedImageInput(name, tensor.name, spec)


def background_level(value: str, where: str) -> int:
    """The grey level of an ``onnxserve.image_background`` value ("" means the default).

    Raises:
        ModelLoadError: for anything but "black" or "white".
    """
    value = value.strip() or DEFAULT_BACKGROUND
    if value not in BACKGROUNDS:
        raise ModelLoadError(f"{where}: parameter {BACKGROUND_PARAMETER!r} is {value!r}; "
                             f"expected one of {', '.join(BACKGROUNDS)}")
    return BACKGROUNDS[value]
