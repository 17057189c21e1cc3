"""Interoperability: the official tritonclient.http (sync and aio) and curl, unchanged,
against onnxserve's HTTP/REST front end."""

from __future__ import annotations

import asyncio
import json
import subprocess

import numpy as np
import pytest
from tritonclient import http as triton
from tritonclient.http import aio as triton_aio
from tritonclient.utils import InferenceServerException

from onnxserve.serving.process import ServerProcess

ECHO_TYPES = {"BOOL": bool, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
              "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
              "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from onnxserve.export.datasets import load_digits

    split = load_digits()
    return split.x_test[:8].astype(np.float32), split.y_test[:8]


def _echo_inputs(binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, dtype in ECHO_TYPES.items():
        tensor = triton.InferInput(f"in_{name}", [2, 2], name)
        tensor.set_data_from_numpy(np.array([[1, 0], [0, 1]], dtype=dtype), binary_data=binary)
        inputs.append(tensor)
    text = triton.InferInput("in_BYTES", [2, 2], "BYTES")
    text.set_data_from_numpy(np.array([[b"hello", b""], [b"x", b"yz"]], dtype=object),
                             binary_data=binary)
    inputs.append(text)
    return inputs


def test_tritonclient_http_drives_onnxserve(server: ServerProcess) -> None:
    assert server.http_url is not None
    client = triton.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("lenet5")
        assert not client.is_model_ready("no_such_model")
        meta = client.get_server_metadata()
        assert meta["name"] == "onnxserve" and "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata("lenet5")
        assert model["platform"] == "onnxruntime_onnx"
        assert model["inputs"] == [{"name": "input", "datatype": "FP32",
                                    "shape": [-1, 28, 28, 1]}]
        assert client.get_model_config("lenet5")["max_batch_size"] == 64
        index = client.get_model_repository_index()
        assert {"name": "lenet5", "version": "1", "state": "READY", "reason": ""} in index

        images, labels = _digits()
        tensor = triton.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        result = client.infer("lenet5", [tensor], request_id="digits-1")
        assert result.get_response()["id"] == "digits-1"
        probs = result.as_numpy("probabilities")
        assert probs.shape == (8, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
        assert (probs.argmax(axis=1) == labels).sum() >= 7

        # JSON both ways gives the same answer as binary both ways
        tensor.set_data_from_numpy(images, binary_data=False)
        as_json = client.infer("lenet5", [tensor], outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=False)])
        np.testing.assert_allclose(as_json.as_numpy("probabilities"), probs, rtol=1e-6)

        top = client.infer("lenet5", [tensor], outputs=[
            triton.InferRequestedOutput("probabilities", class_count=3)])
        for row, predicted in zip(top.as_numpy("probabilities"), probs.argmax(axis=1),
                                  strict=True):
            score, index_text, label = row[0].decode().split(":")
            assert int(index_text) == predicted and label == str(predicted)
            assert 0 < float(score) <= 1

        for binary in (True, False):
            echo = client.infer("echo", _echo_inputs(binary), outputs=[
                triton.InferRequestedOutput(f"out_{n}", binary_data=binary)
                for n in (*ECHO_TYPES, "BYTES")])
            for name, dtype in ECHO_TYPES.items():
                back = echo.as_numpy(f"out_{name}")
                assert back.dtype == np.dtype(dtype), (name, binary)
                np.testing.assert_array_equal(back, np.array([[1, 0], [0, 1]], dtype=dtype))
            # tritonclient gives JSON BYTES back as str, binary ones as bytes
            texts = [[v.decode() if isinstance(v, bytes) else v for v in row]
                     for row in echo.as_numpy("out_BYTES").tolist()]
            assert texts == [["hello", ""], ["x", "yz"]]

        stats = client.get_inference_statistics("lenet5")["model_stats"]
        assert stats[0]["inference_count"] >= 24  # the three infers above

        with pytest.raises(InferenceServerException) as err:
            client.infer("no_such_model", [tensor])
        assert err.value.status() == "404" and "unknown model" in err.value.message()
        wrong = triton.InferInput("input", list(images.shape), "FP64")
        wrong.set_data_from_numpy(images.astype(np.float64))
        with pytest.raises(InferenceServerException) as err:
            client.infer("lenet5", [wrong])
        assert err.value.status() == "400" and "expected datatype FP32" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            client.load_model("lenet5")
        assert err.value.status() == "400" and "model control is off" in err.value.message()
    finally:
        client.close()


def test_tritonclient_http_aio_drives_onnxserve(server: ServerProcess) -> None:
    assert server.http_url is not None
    images, labels = _digits()

    async def session() -> np.ndarray:
        client = triton_aio.InferenceServerClient(server.http_url)
        try:
            assert await client.is_server_ready()
            assert (await client.get_model_metadata("lenet5"))["name"] == "lenet5"
            tensor = triton_aio.InferInput("input", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            answers = await asyncio.gather(*(client.infer("lenet5", [tensor])
                                             for _ in range(4)))
            echo = await client.infer("echo", _echo_inputs(True))
            assert echo.as_numpy("out_BYTES").tolist() == [[b"hello", b""], [b"x", b"yz"]]
            with pytest.raises(InferenceServerException) as err:
                await client.infer("no_such_model", [tensor])
            assert err.value.status() == "404"
            return np.stack([a.as_numpy("probabilities") for a in answers])
        finally:
            await client.close()

    probs = asyncio.run(session())
    assert probs.shape == (4, 8, 10)
    assert np.array_equal(probs[0], probs[3])
    assert (probs[0].argmax(axis=1) == labels).sum() >= 7


def test_curl_drives_onnxserve(server: ServerProcess) -> None:
    url = f"http://{server.http_url}"
    ready = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            f"{url}/v2/health/ready"], capture_output=True, text=True,
                           timeout=30)
    assert ready.stdout == "200"
    body = json.dumps({"inputs": [{"name": "scores_in", "datatype": "FP32", "shape": [1, 5],
                                   "data": [0.1, 0.5, 0.2, 0.9, 0.3]}],
                       "outputs": [{"name": "scores", "parameters": {"classification": 1}}]})
    answer = subprocess.run(["curl", "-s", "-X", "POST", f"{url}/v2/models/scores/infer",
                             "-H", "Content-Type: application/json", "-d", body],
                            capture_output=True, text=True, timeout=30)
    assert json.loads(answer.stdout)["outputs"][0]["data"] == ["0.900000:3:fish"]
