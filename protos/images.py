"""The image preprocessing contract that the server, the client and the exporter share.

A model that takes images says how in its config ``parameters`` (and so in its metadata):
``onnxserve.encoded_image_input`` names a BYTES input of encoded files (JPEG, PNG, ...) the
server decodes, ``onnxserve.preprocessing`` how pixels 0-255 are scaled (``in_graph``: as
they are; ``unit``: / 255; ``tf``: / 127.5 - 1; ``caffe``: BGR minus ImageNet means;
``torch``: ImageNet mean and std), ``onnxserve.image_background`` what transparent pixels
are composited onto. ``decode`` turns one file into one sample exactly as the server does:
Pillow (JPEG in draft mode: the decoder itself scales down by up to 8x when the photo is
much larger than the input), the picture a viewer shows at 8 bits per channel (see
``to_sample``), resized to cover H x W and centre-cropped, converted to RGB or greyscale,
scaled. So an image preprocessed by a client and one the server decodes give the model the
same numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

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


def background_level(value: str) -> int:
    """The grey level of an ``onnxserve.image_background`` value ("" means the default).

    Raises:
        ImageError: for anything but "black" or "white".
    """
    value = value.strip() or DEFAULT_BACKGROUND
    if value not in BACKGROUNDS:
        raise ImageError(f"parameter {BACKGROUND_PARAMETER!r} is {value!r}; expected one of "
                         f"{', '.join(BACKGROUNDS)}")
    return BACKGROUNDS[value]
