"""ServerMetadata lists exactly the protocol extensions the server implements: each listed
extension answers, and each known extension that answers is listed (Triton's names)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build_test_models, start_server

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.dataplane import EXTENSIONS
from onnxserve.serving.process import ServerProcess

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
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository: Path = tmp_path_factory.mktemp("repository")
    build_test_models(repository)
    server = start_server(repository, repository / "server.log")
    yield server
    server.stop()


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
