"""Server metadata lists exactly the protocol extensions the server implements, over gRPC
and over HTTP: each listed extension answers, and each known extension that answers is
listed (Triton's names)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.dataplane import EXTENSIONS
from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

Stub = inference_pb2_grpc.GRPCInferenceServiceStub


def _classification(stub: Stub) -> None:
    request = pb.ModelInferRequest(model_name="scores")
    request.inputs.add(name="scores_in", datatype="FP32", shape=[1, 5])
    request.raw_input_contents.append(np.arange(5, dtype=np.float32).tobytes())
    request.outputs.add(name="scores").parameters["classification"].int64_param = 2
    response = stub.ModelInfer(request, timeout=10)
    if response.outputs[0].datatype != "BYTES":
        raise AssertionError(f"classification answered {response.outputs[0].datatype}")


#: Triton's extension name -> a call that raises grpc.RpcError UNIMPLEMENTED unless the
#: server implements it (any other answer, an error included, means it is there)
PROBES: dict[str, Callable[[Stub], object]] = {
    "classification": _classification,
    "model_configuration": lambda stub: stub.ModelConfig(
        pb.ModelConfigRequest(name="add_one"), timeout=10),
    "model_repository": lambda stub: stub.RepositoryIndex(pb.RepositoryIndexRequest(),
                                                          timeout=10),
    "statistics": lambda stub: stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10),
    "logging": lambda stub: stub.LogSettings(pb.LogSettingsRequest(), timeout=10),
    "system_shared_memory": lambda stub: stub.SystemSharedMemoryStatus(
        pb.SystemSharedMemoryStatusRequest(), timeout=10),
    "cuda_shared_memory": lambda stub: stub.CudaSharedMemoryStatus(
        pb.CudaSharedMemoryStatusRequest(), timeout=10),
    "trace": lambda stub: stub.TraceSetting(pb.TraceSettingRequest(), timeout=10),
}
#: extensions of another front end, with no gRPC call to probe them
OTHER_TRANSPORTS = {"binary_tensor_data"}


@pytest.fixture(scope="module")
def server(test_models_server: ServerProcess) -> ServerProcess:
    return test_models_server


def _http(server: ServerProcess, method: str, path: str, body: bytes = b"",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    assert server.http_url is not None
    host, port = server.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def _implemented(status: int, body: bytes) -> bool:
    """An HTTP answer from a route that exists: not 501, not "no such endpoint"."""
    return status != 501 and not (status == 404 and b"no such endpoint" in body)


def _http_route(method: str, path: str) -> Callable[[ServerProcess], bool]:
    def probe(server: ServerProcess) -> bool:
        status, _, body = _http(server, method, path)
        return _implemented(status, body)

    return probe


def _http_classification(server: ServerProcess) -> bool:
    request = {"inputs": [{"name": "scores_in", "datatype": "FP32", "shape": [1, 5],
                           "data": [0.0, 1.0, 2.0, 3.0, 4.0]}],
               "outputs": [{"name": "scores", "parameters": {"classification": 2}}]}
    status, _, body = _http(server, "POST", "/v2/models/scores/infer",
                            json.dumps(request).encode())
    return status == 200 and json.loads(body)["outputs"][0]["datatype"] == "BYTES"


def _http_binary_tensor_data(server: ServerProcess) -> bool:
    header = json.dumps({"inputs": [{"name": "scores_in", "datatype": "FP32",
                                     "shape": [1, 5], "parameters": {"binary_data_size": 20}}],
                         "parameters": {"binary_data_output": True}}).encode()
    status, headers, _ = _http(server, "POST", "/v2/models/scores/infer",
                               header + np.arange(5, dtype=np.float32).tobytes(),
                               {"Inference-Header-Content-Length": str(len(header))})
    return status == 200 and "Inference-Header-Content-Length" in headers


#: Triton's extension name -> whether the server answers it over HTTP (an error from a
#: route that exists counts as answering; 501 or an unknown route does not)
HTTP_PROBES: dict[str, Callable[[ServerProcess], bool]] = {
    "classification": _http_classification,
    "binary_tensor_data": _http_binary_tensor_data,
    "model_configuration": _http_route("GET", "/v2/models/add_one/config"),
    "model_repository": _http_route("POST", "/v2/repository/index"),
    "statistics": _http_route("GET", "/v2/models/stats"),
    "logging": _http_route("GET", "/v2/logging"),
    "system_shared_memory": _http_route("GET", "/v2/systemsharedmemory/status"),
    "cuda_shared_memory": _http_route("GET", "/v2/cudasharedmemory/status"),
    "trace": _http_route("GET", "/v2/trace/setting"),
}


def _answers(stub: Stub, probe: Callable[[Stub], object]) -> bool:
    try:
        probe(stub)
    except grpc.RpcError as exc:
        return exc.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


def test_server_metadata_lists_exactly_the_extensions_that_answer(
        server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = Stub(channel)
        listed = list(stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions)
        answering = {name for name, probe in PROBES.items() if _answers(stub, probe)}
    assert tuple(listed) == EXTENSIONS or set(listed) - set(EXTENSIONS) <= OTHER_TRANSPORTS
    assert len(set(listed)) == len(listed)
    unknown = set(listed) - set(PROBES) - OTHER_TRANSPORTS
    assert not unknown, f"listed extensions with no probe here: {unknown}"
    assert set(listed) & set(PROBES) == answering


def test_http_server_metadata_lists_exactly_the_extensions_that_answer(
        server: ServerProcess) -> None:
    status, _, body = _http(server, "GET", "/v2")
    assert status == 200
    listed = json.loads(body)["extensions"]
    assert listed == [*EXTENSIONS, *sorted(OTHER_TRANSPORTS)]
    unknown = set(listed) - set(HTTP_PROBES)
    assert not unknown, f"listed extensions with no HTTP probe here: {unknown}"
    assert set(listed) == {name for name, probe in HTTP_PROBES.items() if probe(server)}
