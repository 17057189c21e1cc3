"""The real server over gRPC, driven by our client and by hand-made requests."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from support.onnx_models import add_one_model
from support.repositories import SCORES_LABELS, write_config
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.protos.codec import encode_contents
from onnxserve.protos.datatypes import DATATYPES
from onnxserve.serving.process import ServerProcess

ECHO = {
    name: (np.array([[True, False], [False, True]]) if name == "BOOL"
           else np.array([[b"", b"\x00\xff"], [b"abc", "é".encode()]], dtype=object)
           if name == "BYTES" else np.array([[0, 1], [2, 3]], dtype=DATATYPES[name].numpy))
    for name in DATATYPES
}
# onnxruntime's string tensors hold text, so the echo model's BYTES must be UTF-8.
ECHO["BYTES"] = np.array([[b"", b"text"], [b"abc", "é".encode()]], dtype=object)


@pytest.fixture
def stub(server: ServerProcess):
    with grpc.insecure_channel(server.url) as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_health_and_metadata(client: Client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lenet5") and client.is_model_ready("add_one", "2")
    assert not client.is_model_ready("missing") and not client.is_model_ready("add_one", "9")
    meta = client.server_metadata()
    assert meta["name"] == "onnxserve" and "classification" in meta["extensions"]
    lenet = client.model_metadata("lenet5")
    assert lenet.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in lenet.inputs] == [
        ("input", "FP32", (-1, 28, 28, 1))
    ]
    assert lenet.parameters["execution_provider"] == "CPUExecutionProvider"
    assert float(lenet.parameters["onnxserve.heldout_accuracy"]) >= 0.95
    add_one = client.model_metadata("add_one")  # no config.pbtxt: completed from the file
    assert add_one.versions == ("2",)
    assert [t.name for t in add_one.outputs] == ["y", "z"]


def test_every_datatype_round_trips_through_a_model(client: Client) -> None:
    inputs = {f"in_{name}": value for name, value in ECHO.items()}
    outputs = client.infer("echo", inputs)
    for name, value in ECHO.items():
        got = outputs[f"out_{name}"]
        assert got.shape == value.shape, name
        assert got.tolist() == value.tolist(), name


def test_fp16_in_typed_contents_is_rejected(stub) -> None:
    request = pb.ModelInferRequest(model_name="echo")
    for name, value in ECHO.items():
        tensor = request.inputs.add(name=f"in_{name}", datatype=name, shape=value.shape)
        if name != "FP16":
            tensor.contents.CopyFrom(encode_contents(value, DATATYPES[name]))
    code, details = _infer_error(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_FP16': FP16 has no typed contents field" in details


def test_typed_contents_accepted(client: Client) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = client.infer("add_one", {"x": x}, raw=False)
    np.testing.assert_array_equal(out["y"], x + 1)
    np.testing.assert_array_equal(out["z"], x * 2)


def test_requested_outputs_and_versions(client: Client) -> None:
    x = np.ones((3, 4), dtype=np.float32)
    out = client.infer("add_one", {"x": x}, ["z"], version="2")
    assert list(out) == ["z"]
    with pytest.raises(InferenceServerError) as info:
        client.infer("add_one", {"x": x}, version="1")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_classification_extension(client: Client) -> None:
    scores = np.array([[0.1, 0.5, 0.2, 0.15, 0.05]], dtype=np.float32)
    out = client.infer("scores", {"scores_in": scores}, ["scores"], classification=2)
    assert out["scores"].tolist() == [[b"0.500000:1:dog", b"0.200000:2:bird"]]
    assert SCORES_LABELS[1] == "dog"


def test_lenet5_predicts_digits(client: Client, lenet5_export) -> None:
    from onnxserve.export.datasets import load_digits

    split = load_digits()
    out = client.infer("lenet5", {"input": split.x_test[:64]})
    accuracy = float(np.mean(out["probabilities"].argmax(axis=1) == split.y_test[:64]))
    assert accuracy >= 0.9


def _infer_error(stub, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    return info.value.code(), info.value.details()


def _request(shape=(1, 4), datatype="FP32", raw: bytes | None = None, name="x", model="add_one"):
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(
        raw if raw is not None else np.zeros(shape, np.float32).tobytes()
    )
    return request


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (_request(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (_request(name="w"), grpc.StatusCode.INVALID_ARGUMENT, "has no input 'w'"),
        (_request(datatype="INT32"), grpc.StatusCode.INVALID_ARGUMENT,
         "input 'x': expected datatype FP32, got 'INT32'"),
        (_request(datatype="FP8"), grpc.StatusCode.INVALID_ARGUMENT, "expected datatype FP32"),
        (_request(shape=(1, 5)), grpc.StatusCode.INVALID_ARGUMENT,
         r"input 'x': expected shape [-1, 4], got [1, 5]"),
        (_request(raw=b"\x00" * 15), grpc.StatusCode.INVALID_ARGUMENT,
         "input 'x': raw data is 15 bytes but shape [1, 4] of FP32 needs 16 bytes"),
        (_request(shape=(10**9, 4), raw=b""), grpc.StatusCode.INVALID_ARGUMENT, "outside 1..32"),
        (pb.ModelInferRequest(model_name="add_one"), grpc.StatusCode.INVALID_ARGUMENT,
         "needs input(s) x"),
    ],
    ids=["unknown-model", "unknown-input", "wrong-type", "bad-type", "wrong-shape",
         "short-raw", "huge-batch", "missing-input"],
)
def test_bad_requests_get_clear_statuses(stub, request_, code, message) -> None:
    got_code, details = _infer_error(stub, request_)
    assert got_code == code
    assert message in details


def test_timeout_parameter_must_be_microseconds(stub) -> None:
    request = _request()
    request.parameters["timeout"].string_param = "soon"
    code, details = _infer_error(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "microseconds" in details
    request.parameters["timeout"].int64_param = 1_000_000
    assert stub.ModelInfer(request, timeout=10).outputs


def test_mixing_raw_and_contents_is_rejected(stub) -> None:
    request = _request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    code, details = _infer_error(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "both contents and raw" in details


def test_raw_count_must_match_inputs(stub) -> None:
    request = _request()
    request.raw_input_contents.append(b"")
    code, details = _infer_error(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "2 entries" in details


def test_non_utf8_bytes_for_a_string_model_is_invalid(client: Client) -> None:
    inputs = {f"in_{name}": value for name, value in ECHO.items()}
    inputs["in_BYTES"] = np.array([[b"\xff", b""], [b"", b""]], dtype=object)
    with pytest.raises(InferenceServerError) as info:
        client.infer("echo", inputs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not UTF-8" in info.value.message


def test_large_batch_of_224_images_fits_message_limit(client: Client) -> None:
    # 32 x 224x224x3 float32 = 19 MB, far above gRPC's 4 MB default.
    big = np.zeros((32, 224 * 224 * 3 // 4 * 4), dtype=np.float32)
    with pytest.raises(InferenceServerError) as info:
        client.infer("add_one", {"x": big})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT  # wrong shape, but it arrived
    assert "expected shape" in info.value.message


def test_server_keeps_serving_after_bad_requests(stub, client: Client) -> None:
    for _ in range(20):
        _infer_error(stub, _request(raw=b"\x01"))
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_array_equal(client.infer("add_one", {"x": x})["y"], x + 1)


def test_concurrent_requests_all_answered_correctly(server: ServerProcess) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> bool:
        with Client(server.url) as c:
            x = np.full((1 + i % 3, 4), float(i), dtype=np.float32)
            return bool(np.array_equal(c.infer("add_one", {"x": x})["y"], x + 1))

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(200)))


def test_statistics_follow_requests(client: Client) -> None:
    before = client.statistics("scores")[0]
    x = np.zeros((3, 5), np.float32)
    for _ in range(4):
        client.infer("scores", {"scores_in": x})
    after = client.statistics("scores")[0]
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["success"]["count"] - before["success"]["count"] == 4
    assert after["compute_infer"]["ns"] > before["compute_infer"]["ns"]
    assert after["batches"].get(3, 0) >= 4
    assert {s["name"] for s in client.statistics()} >= {"scores", "lenet5", "add_one"}
    with pytest.raises(InferenceServerError) as info:
        client.statistics("missing")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_failed_model_reports_why_and_others_serve(tmp_path) -> None:
    add_one_model(tmp_path / "good" / "1" / "model.onnx")
    write_config(tmp_path / "broken", "max_batch_size: 4\nnot_a_field: 1\n")
    (tmp_path / "broken" / "1").mkdir()
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"junk")
    proc = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(proc.url) as client:
            assert not client.is_server_ready()  # strict readiness: one model failed
            assert client.is_model_ready("good") and not client.is_model_ready("broken")
            index = {m["name"]: m for m in client.models()}
            assert index["broken"]["state"] == "UNAVAILABLE"
            assert "not_a_field" in index["broken"]["reason"]
            with pytest.raises(InferenceServerError) as info:
                client.infer("broken", {"x": np.zeros((1, 4), np.float32)})
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            x = np.zeros((1, 4), np.float32)
            np.testing.assert_array_equal(client.infer("good", {"x": x})["y"], x + 1)
    finally:
        assert proc.stop() == 0
    assert "model_load_failed model=broken" in proc.output()


def test_providers_cuda_without_cuda_fails_the_load_loudly(tmp_path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; covered by test_providers")
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    proc = start_server(tmp_path, tmp_path / "server.log", "--providers", "cuda")
    try:
        with Client(proc.url) as client:
            assert not client.is_model_ready("m")
            reason = client.models()[0]["reason"]
            # the flag asked for the GPU, not an instance_group the config does not have
            assert "--providers cuda asks for GPU instances" in reason, reason
            assert "instance_group" not in reason, reason
    finally:
        proc.stop()
    assert "no CUDA execution provider" in proc.output()


def test_sigterm_stops_cleanly(tmp_path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    proc = start_server(tmp_path, tmp_path / "server.log")
    assert proc.stop() == 0
    assert "stopped" in proc.output()
