"""Models with variable image sizes: any size the model can compute is answered, the others
get INVALID_ARGUMENT naming the input, never INTERNAL."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from support.onnx_models import variable_image_model
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError


def test_variable_size_images_are_served(tmp_path: Path) -> None:
    path = variable_image_model(tmp_path / "any_size" / "1" / "model.onnx")
    reference = ort.InferenceSession(str(path))
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(server.url) as client:
            assert client.is_model_ready("any_size")
            assert client.model_metadata("any_size").inputs[0].shape == (-1, -1, -1, 3)
            rng = np.random.default_rng(0)
            for shape in ((1, 64, 80, 3), (1, 224, 224, 3), (2, 3, 3, 3)):
                images = rng.random(shape, np.float32)
                got = client.infer("any_size", {"images": images})["scores"]
                np.testing.assert_allclose(got, reference.run(None, {"images": images})[0],
                                           rtol=1e-5, atol=1e-5)
            for shape, message in (((1, 0, 5, 3), "empty variable dimension"),
                                   ((1, 1, 1, 3), "the model cannot compute this input"),
                                   ((1, 2, 5, 3), "the model cannot compute this input")):
                with pytest.raises(InferenceServerError) as err:
                    client.infer("any_size", {"images": np.ones(shape, np.float32)})
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, shape
                assert message in err.value.message
            # The server is unharmed.
            ok = client.infer("any_size", {"images": np.ones((1, 8, 8, 3), np.float32)})
            assert ok["scores"].shape == (1, 4)
    finally:
        server.stop()
