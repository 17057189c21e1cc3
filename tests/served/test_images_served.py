"""Encoded image input on a served model: files in, the model's pixels decoded from them, and
bad files refused as the client's error (decoding itself: tests/unit/models/test_images.py)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image
from support.images import IMAGE_CONFIG, encoded, saved
from support.onnx_models import channel_mean_model
from support.repositories import write_config
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.serving.process import ServerProcess


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server holding "m": per-channel means of 8x8 images, which also takes files."""
    folder = tmp_path_factory.mktemp("images")
    channel_mean_model(folder / "m" / "1" / "model.onnx")
    write_config(folder / "m", IMAGE_CONFIG)
    server = start_server(folder, folder / "server.log")
    yield server
    server.stop()


def test_server_decodes_encoded_images(image_server: ServerProcess) -> None:
    server = image_server
    with Client(server.url) as client:
        meta = client.model_metadata("m")
        assert meta.parameters["encoded_image_input"].startswith("image_bytes: BYTES")
        files = np.array([[encoded((10, 20, 30))], [encoded((200, 100, 0), fmt="JPEG")]],
                         dtype=object)
        means = client.infer("m", {"image_bytes": files})["means"]
        assert means[0].tolist() == [10, 20, 30]
        assert np.abs(means[1] - [200, 100, 0]).max() <= 4
        pixels = np.full((1, 8, 8, 3), 7, np.uint8)  # raw pixels still work
        assert client.infer("m", {"images": pixels})["means"].tolist() == [[7, 7, 7]]
        bad = np.array([[b"not an image"]], dtype=object)
        for inputs, text in (({"image_bytes": bad}, "image 0: cannot decode"),
                             ({"image_bytes": files[:1], "images": pixels},
                              "alternatives"),
                             ({"image_bytes": np.array([b"x"], dtype=object)},
                              "expected shape [-1, 1]")):
            with pytest.raises(InferenceServerError) as err:
                client.infer("m", inputs)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert text in err.value.message
        again = client.infer("m", {"image_bytes": files[:1]})["means"]
        assert again.tolist() == [[10, 20, 30]]


def test_server_refuses_float_pixels_by_mode(image_server: ServerProcess) -> None:
    with Client(image_server.url) as client:
        floats = saved(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF")
        with pytest.raises(InferenceServerError) as err:
            client.infer("m", {"image_bytes": np.array([[floats]], dtype=object)})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 0: the image has floating-point pixels (Pillow mode F)" in (
            err.value.message)
