"""The naming rule for model names and version numbers (onnxserve.protos.naming) on a served
repository: requests, model control and the repository scan over gRPC and HTTP (the rule
itself: tests/unit/wire/test_naming.py)."""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.parse
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from support.naming import BAD_VERSIONS
from support.onnx_models import add_one_model
from support.served import start_server

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    repository = tmp_path_factory.mktemp("naming")
    for folder in ("1", "\u00b2"):  # a stray '²/' beside '1/'
        add_one_model(repository / "add_one" / folder / "model.onnx")
    add_one_model(repository / "my model" / "1" / "model.onnx")
    add_one_model(repository / ".hidden" / "1" / "model.onnx")
    server = start_server(repository, repository.parent / "naming.log",
                          "--model-control-mode", "explicit", "--load-model", "*")
    yield server
    server.stop()
    assert "Traceback" not in server.output()


@contextlib.contextmanager
def _stub(server) -> Iterator[inference_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.url)
    try:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


def _http(server, method: str, path: str) -> tuple[int, bytes]:
    host, port = server.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        body = json.dumps(INFER_BODY) if path.endswith("/infer") else b"{}"
        connection.request(method, path, body=body if method == "POST" else None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


INFER_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                         "data": [0.0, 0.0, 0.0, 0.0]}]}


def _infer_request(version: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_one", model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    return request


def test_a_stray_folder_leaves_the_model_ready_and_skipped_folders_are_named(served) -> None:
    with _stub(served) as stub:
        assert stub.ModelReady(pb.ModelReadyRequest(name="add_one")).ready
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert {(m.name, m.version, m.state) for m in index.models} == {("add_one", "1", "READY")}
        assert stub.ModelInfer(_infer_request("1")).model_version == "1"
    status, body = _http(served, "POST", "/v2/models/add_one/versions/1/infer")
    assert status == 200 and json.loads(body)["model_version"] == "1"
    log = served.output()
    assert "ignored folder(s) '\u00b2'" in log
    skipped = next(line for line in log.splitlines() if "skipped folder(s)" in line)
    assert "'my model' has ' '" in skipped and "'.hidden' starts with '.'" in skipped


@pytest.mark.parametrize("version", BAD_VERSIONS[:7] + BAD_VERSIONS[-3:])
def test_a_version_that_is_not_a_number_is_not_found_over_grpc(served, version: str) -> None:
    with _stub(served) as stub:
        assert not stub.ModelReady(pb.ModelReadyRequest(name="add_one", version=version)).ready
        calls = [
            lambda: stub.ModelInfer(_infer_request(version)),
            lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="add_one", version=version)),
            lambda: stub.ModelConfig(pb.ModelConfigRequest(name="add_one", version=version)),
            lambda: stub.ModelStatistics(
                pb.ModelStatisticsRequest(name="add_one", version=version)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
            assert "has no version" in caught.value.details()


@pytest.mark.parametrize("version", ["\u00b2", "\u0663", "+1", "1_0", "1" * 5000])
def test_a_version_that_is_not_a_number_is_404_over_http(served, version: str) -> None:
    prefix = "/v2/models/add_one/versions/" + urllib.parse.quote(version, safe="")
    assert _http(served, "GET", prefix + "/ready")[0] == 400  # not ready, as Triton says
    for method, path in (("GET", prefix), ("GET", prefix + "/config"),
                         ("GET", prefix + "/stats"), ("POST", prefix + "/infer")):
        status, body = _http(served, method, path)
        assert status == 404, (path[:80], body[:300])
        assert b"has no version" in body


@pytest.mark.parametrize("name", ["../evil", "my model", ".hidden", "..", "add_one/1"])
def test_model_names_in_requests_follow_the_rule(served, name: str) -> None:
    with _stub(served) as stub:
        assert not stub.ModelReady(pb.ModelReadyRequest(name=name)).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid model name" in caught.value.details()
    quoted = urllib.parse.quote(name, safe="")
    for action in ("load", "unload"):
        status, body = _http(served, "POST", f"/v2/repository/models/{quoted}/{action}")
        assert status == 400, body
        assert b"invalid model name" in body
    assert _http(served, "GET", f"/v2/models/{quoted}")[0] == 404
