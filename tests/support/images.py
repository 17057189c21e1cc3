"""Image files for the encoded image input's tests, and a model config that takes them."""

from __future__ import annotations

import io

from PIL import Image

#: a model "m" of 8x8 RGB images that also takes encoded files (channel_mean_model)
IMAGE_CONFIG = (
    'name: "m"\nmax_batch_size: 8\n'
    'input { name: "images" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [8, 8, 3] }\n'
    'parameters { key: "onnxserve.encoded_image_input" value { string_value: "image_bytes" } }\n'
)


def encoded(color: tuple[int, int, int], size=(20, 12), fmt: str = "PNG") -> bytes:
    """A file of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def saved(image: Image.Image, fmt: str, orientation: int | None = None, **kwargs) -> bytes:
    """``image`` as a file, with an EXIF orientation if one is given."""
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()
