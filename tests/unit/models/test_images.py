"""Encoded image input: the server decodes JPEG/PNG files into the model's image input."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from support.images import IMAGE_CONFIG, encoded, saved

from onnxserve.protos.images import ImageError, ImageSpec, decode
from onnxserve.serving.errors import InvalidInputError, ModelLoadError
from onnxserve.serving.models.images import EncodedImageInput, decode_batch
from onnxserve.serving.models.images import encoded_image_input as _encoded_image_input
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.repository import parse_config


def encoded_image_input(config):
    return _encoded_image_input(config, model_options(config))


def test_the_config_parameter_declares_the_encoded_input() -> None:
    found = encoded_image_input(parse_config(IMAGE_CONFIG, "t"))
    assert found == EncodedImageInput("image_bytes", "images",
                                      ImageSpec(8, 8, 3, np.dtype(np.uint8), "in_graph", False))
    assert encoded_image_input(parse_config('name: "m"', "t")) is None


@pytest.mark.parametrize(("change", "message"), [
    (("dims: [8, 8, 3]", "dims: [8, 8, 4]"), "4 channels"),
    (("dims: [8, 8, 3]", "dims: [-1, 8, 3]"), "fixed dims"),
    (("TYPE_UINT8", "TYPE_STRING"), "UINT8/FP16/FP32/FP64"),
    (('"image_bytes"', '"images"'), "already one of the model's inputs"),
    (("max_batch_size: 8", "max_batch_size: 0"), "must batch"),
    (("dims: [8, 8, 3] }", 'dims: [8, 8, 3] }\ninput { name: "b" data_type: TYPE_FP32 dims: [1] }'),
     "exactly one required input"),
])
def test_unusable_image_configs_are_load_errors(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        encoded_image_input(parse_config(IMAGE_CONFIG.replace(*change), "t"))


def test_png_and_jpeg_decode_resize_and_scale() -> None:
    spec = ImageSpec(8, 8, 3, np.dtype(np.uint8))
    sample = decode(encoded((10, 200, 30)), spec)
    assert sample.shape == (8, 8, 3) and sample.dtype == np.uint8
    assert sample.reshape(-1, 3).tolist() == [[10, 200, 30]] * 64
    jpeg = decode(encoded((10, 200, 30), fmt="JPEG"), spec).astype(int)
    assert np.abs(jpeg - [10, 200, 30]).max() <= 4  # lossy
    grey = decode(encoded((255, 255, 255)), ImageSpec(4, 4, 1, np.dtype(np.float32), "unit"))
    assert grey.shape == (4, 4, 1) and np.allclose(grey, 1.0)
    first = decode(encoded((0, 0, 255)), ImageSpec(2, 3, 3, np.dtype(np.float32), "tf", True))
    assert first.shape == (3, 2, 3) and np.allclose(first[2], 1.0) and np.allclose(first[0], -1)


def test_a_large_jpeg_decoded_in_draft_mode_stays_close_to_a_full_decode() -> None:
    from sklearn.datasets import load_sample_images

    photo = Image.open(load_sample_images().filenames[0]).convert("RGB")
    big = photo.resize((photo.width * 3, photo.height * 3))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=95)
    spec = ImageSpec(224, 224, 3, np.dtype(np.float32))
    drafted = decode(buffer.getvalue(), spec)
    from onnxserve.protos.images import to_sample

    full = to_sample(Image.open(io.BytesIO(buffer.getvalue())), spec)
    # Draft decoding averages 8x8 DCT blocks instead of resampling all pixels: 4.5x faster
    # on this 2.5 MP photo, and a mean difference of about 6 of 255.
    assert np.abs(drafted - full).mean() < 8


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot decode"),
    (b"GIF89a nonsense", "cannot decode"),
])
def test_corrupt_images_are_image_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode(data, ImageSpec(8, 8, 3, np.dtype(np.uint8)))


def test_images_too_large_are_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="8000x6000 pixels"):
        decode(buffer.getvalue(), ImageSpec(8, 8, 3, np.dtype(np.uint8)))


def test_a_bad_image_in_a_batch_names_its_index() -> None:
    target = encoded_image_input(parse_config(IMAGE_CONFIG, "t"))
    items = np.array([[encoded((1, 2, 3))], [b"junk"]], dtype=object)
    with pytest.raises(InvalidInputError, match="input 'image_bytes': image 1: cannot decode"):
        decode_batch(items, target)


# --- The image the user sees is the image the model sees ------------------------------------

#: EXIF orientation -> the transpose that makes the stored pixels from the upright picture
#: (the inverse of what a viewer applies).
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
          6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def _asymmetric(width: int = 12, height: int = 8) -> Image.Image:
    """A picture that every flip and rotation changes: a bright top-left corner block."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 3] = (250, 40, 10)
    pixels[-1, :] = (10, 40, 250)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = _asymmetric()
    stored = upright.transpose(STORED[orientation])
    spec = ImageSpec(8, 12, 3, np.dtype(np.uint8))
    expected = decode(saved(upright, "PNG"), spec)
    assert not np.array_equal(decode(saved(stored, "PNG"), spec), expected)
    np.testing.assert_array_equal(decode(saved(stored, "PNG", orientation), spec), expected)
    # JPEG, through the draft-mode decoder: lossy, so compared within a margin.
    big = upright.resize((upright.width * 40, upright.height * 40), Image.Resampling.NEAREST)
    jpeg = saved(big.transpose(STORED[orientation]), "JPEG", orientation, quality=95)
    got = decode(jpeg, spec).astype(int)
    assert np.abs(got - expected).mean() < 6, orientation


def test_sixteen_bit_pixels_are_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    eight = ((ramp.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    spec = ImageSpec(16, 16, 1, np.dtype(np.uint8))
    for fmt in ("PNG", "TIFF"):
        got = decode(saved(Image.fromarray(ramp), fmt), spec)[..., 0]
        np.testing.assert_array_equal(got, eight)
    big_endian = Image.frombytes("I;16B", (16, 16), ramp.astype(">u2").tobytes())
    np.testing.assert_array_equal(decode(saved(big_endian, "TIFF"), spec)[..., 0], eight)
    # As colour: the same grey in each channel.
    rgb = decode(saved(Image.fromarray(ramp), "PNG"), ImageSpec(16, 16, 3, np.dtype(np.uint8)))
    np.testing.assert_array_equal(rgb, np.repeat(eight[..., None], 3, axis=2))


@pytest.mark.parametrize(("pixels", "mode"), [
    (np.arange(64, dtype=np.int32).reshape(8, 8) * 1000, "32-bit integer pixels (Pillow mode I)"),
    (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "floating-point pixels (Pillow "
                                                            "mode F)"),
])
def test_pixels_without_an_eight_bit_range_are_refused(pixels: np.ndarray, mode: str) -> None:
    with pytest.raises(ImageError, match=re.escape(mode)):
        decode(saved(Image.fromarray(pixels), "TIFF"), ImageSpec(8, 8, 1, np.dtype(np.uint8)))


def _white_on_transparent() -> Image.Image:
    """A white stroke on fully transparent white: what drawing programs export."""
    alpha = np.zeros((8, 8), np.uint8)
    alpha[2:6, 3:5] = 255
    return Image.merge("LA", (Image.new("L", (8, 8), 255), Image.fromarray(alpha)))


def test_transparent_pixels_are_composited_onto_the_background() -> None:
    stroke = np.zeros((8, 8), bool)
    stroke[2:6, 3:5] = True
    image = _white_on_transparent()
    for source in (image, image.convert("RGBA"), image.convert("RGBA").convert("P")):
        for background, level in (("black", 0), ("white", 255)):
            spec = ImageSpec(8, 8, 1, np.dtype(np.uint8), background=level)
            got = decode(saved(source, "PNG"), spec)[..., 0]
            assert (got[stroke] == 255).all() and (got[~stroke] == level).all(), (
                source.mode, background)
    # Half transparency blends.
    half = Image.new("RGBA", (4, 4), (200, 100, 0, 128))
    got = decode(saved(half, "PNG"), ImageSpec(4, 4, 3, np.dtype(np.uint8)))
    assert np.abs(got.astype(int) - [100, 50, 0]).max() <= 1


def test_the_background_is_a_model_parameter() -> None:
    config = IMAGE_CONFIG + ('parameters { key: "onnxserve.image_background" '
                             'value { string_value: "white" } }\n')
    assert encoded_image_input(parse_config(config, "t")).spec.background == 255
    assert encoded_image_input(parse_config(IMAGE_CONFIG, "t")).spec.background == 0
    with pytest.raises(ModelLoadError, match=re.escape(
            "parameter 'onnxserve.image_background' must be one of black, white, not 'grey'")):
        encoded_image_input(parse_config(config.replace('"white"', '"grey"'), "t"))
