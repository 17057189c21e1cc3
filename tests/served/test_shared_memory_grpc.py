"""Triton's system shared memory extension over gRPC: the official tritonclient, unchanged,
against a real server; hostile parameters; regions unmapped on unregister and at exit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import shared_memory as mpshm
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import SUPPORT
from support.onnx_models import ECHO_TYPES
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

#: the extension's gRPC side is tested here: no HTTP port
GRPC_ONLY = ("--http-port", "0")


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("shm")
    build_test_models(repository)
    server = start_server(repository, repository / "server.log", *GRPC_ONLY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(shm_server: ServerProcess) -> Iterator[inference_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(shm_server.url) as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def _mappings(pid: int, key: str) -> int:
    """How many mappings of shared memory object ``key`` process ``pid`` has (an unlinked
    object's path ends in " (deleted)")."""
    path = f"/dev/shm/{key.lstrip('/')}"
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sum(line.split(maxsplit=5)[-1].removesuffix(" (deleted)") == path
               for line in lines)


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_tritonclient_uses_system_shared_memory(shm_server: ServerProcess) -> None:
    result = subprocess.run(
        [sys.executable, str(SUPPORT / "triton_shm_interop.py"), shm_server.url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    in_key, out_key = r["keys"]
    assert sorted((s["name"], s["key"], int(s.get("offset", 0)), int(s["byte_size"]))
                  for s in r["status"]["regions"].values()) == [("in", in_key, 0, 4096),
                                                       ("out", out_key, 1024, 2048)]
    assert list(r["status_out"]["regions"]) == ["out"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for offset, scale in ((0, 1), (64, 10)):
        answer = r[f"add_one_{offset}"]
        assert answer["y"] == (x * scale + 1).tolist()
        assert answer["z"] == (x * scale * 2).tolist()  # the raw output beside it
        assert answer["y_output"]["datatype"] == "FP32"
        assert answer["y_output"]["shape"] == [2, 4]
        params = answer["y_output"]["parameters"]
        assert params["shared_memory_region"] == {"string_param": "out"}
        assert params["shared_memory_byte_size"] == {"int64_param": "32"}
        assert params["shared_memory_offset"] == {"int64_param": "16"}
    echo = r["echo"]
    assert echo["bytes"] == [["hello", ""], ["x", "yz"]]
    assert echo["bytes_parameters"]["shared_memory_byte_size"] == {"int64_param": "24"}
    assert echo["fp16"] == [[1.0, 0.0], [0.0, 1.0]]
    assert echo["int32"] == [[1, -2], [3, -4]]  # read from shared memory, answered raw
    assert echo["fp64"] == [[1.0, 0.0], [0.0, 1.0]]
    assert echo["bool"] == [[True, False], [False, True]]
    errors = r["errors"]
    expected = {
        "unregistered_region": ("NOT_FOUND", "no system shared memory region 'nope'"),
        "offset_past_region": ("INVALID_ARGUMENT", "input 'x': shared_memory_offset 4090 + "
                               "shared_memory_byte_size 32 = 4122 runs past the end of shared "
                               "memory region 'in' (4096 bytes)"),
        "size_not_tensor": ("INVALID_ARGUMENT", "input 'x': shared_memory_byte_size is 16 but "
                            "shape [2, 4] of FP32 needs 32 bytes"),
        "output_too_small": ("INVALID_ARGUMENT", "output 'y' needs 32 bytes (FP32 [2, 4]) but "
                             "its shared memory placement in region 'out' has "
                             "shared_memory_byte_size 16"),
        "output_past_region": ("INVALID_ARGUMENT", "output 'y': shared_memory_offset 2040"),
        "duplicate": ("ALREADY_EXISTS", "shared memory region 'in' is already registered"),
        "bad_key": ("INVALID_ARGUMENT", "is not a POSIX shared memory name"),
        "missing_key": ("NOT_FOUND", "no POSIX shared memory object has key"),
        "past_object": ("INVALID_ARGUMENT", "offset 8 + byte_size 4096 = 4104 is past the end "
                        "of shared memory object"),
        "status_unknown": ("NOT_FOUND", "no system shared memory region 'nope'"),
        "cuda_register": ("UNIMPLEMENTED", "CUDA shared memory is not supported"),
        "cuda_status": ("UNIMPLEMENTED", "CUDA shared memory is not supported"),
        "unregistered_after": ("NOT_FOUND", "no system shared memory region 'in'"),
    }
    for label, (code, text) in expected.items():
        assert errors[label] is not None, label
        status, message = errors[label]
        assert status == f"StatusCode.{code}", (label, errors[label])
        assert text in message, (label, message)
    assert list(r["after_unregister_in"]["regions"]) == ["out"]
    assert r["after_unregister_all"].get("regions", {}) == {}
    # Unregistered regions are unmapped; "kept" (on the out object) is still mapped.
    assert _wait_for(lambda: _mappings(shm_server.pid, in_key) == 0)
    assert _mappings(shm_server.pid, out_key) == 1
    stub_channel = grpc.insecure_channel(shm_server.url)
    with stub_channel:
        service = inference_pb2_grpc.GRPCInferenceServiceStub(stub_channel)
        service.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
    assert _wait_for(lambda: _mappings(shm_server.pid, out_key) == 0)


def _register(stub, name: str, key: str, byte_size: int = 4096, offset: int = 0) -> None:
    stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
        name=name, key=key, offset=offset, byte_size=byte_size))


def _x_request(parameters: dict[str, pb.InferParameter], raw: list[bytes] | None = None,
               output_parameters: dict[str, pb.InferParameter] | None = None,
               ) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_one")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    for key, value in parameters.items():
        tensor.parameters[key].CopyFrom(value)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    if output_parameters is not None:
        output = request.outputs.add(name="y")
        for key, value in output_parameters.items():
            output.parameters[key].CopyFrom(value)
    return request


def _s(text: str) -> pb.InferParameter:
    return pb.InferParameter(string_param=text)


def _i(number: int) -> pb.InferParameter:
    return pb.InferParameter(int64_param=number)


def test_hostile_shared_memory_parameters(stub, block: mpshm.SharedMemory) -> None:
    key = "/" + block.name.lstrip("/")
    block.buf[:32] = np.ones(8, np.float32).tobytes()
    _register(stub, "h", key)
    try:
        region = {"shared_memory_region": _s("h"), "shared_memory_byte_size": _i(32)}
        cases = {
            "region as a number": ({"shared_memory_region": _i(3),
                                    "shared_memory_byte_size": _i(32)},
                                   "'shared_memory_region' must be a region's name"),
            "size as a string": ({"shared_memory_region": _s("h"),
                                  "shared_memory_byte_size": _s("32")},
                                 "'shared_memory_byte_size' must be an integer >= 0, got '32'"),
            "negative offset": ({**region, "shared_memory_offset": _i(-8)},
                                "'shared_memory_offset' must be an integer >= 0, got -8"),
            "huge offset": ({**region, "shared_memory_offset": _i(2**62)}, "runs past the end"),
            "huge size": ({"shared_memory_region": _s("h"),
                           "shared_memory_byte_size": _i(2**63 - 1)}, "runs past the end"),
            "offset alone": ({"shared_memory_offset": _i(0)},
                             "can only be given with 'shared_memory_region'"),
            "no size": ({"shared_memory_region": _s("h")},
                        "'shared_memory_byte_size' must be given with"),
            "unset value": ({"shared_memory_region": pb.InferParameter(),
                             "shared_memory_byte_size": _i(32)}, "got None"),
        }
        for label, (parameters, text) in cases.items():
            with pytest.raises(grpc.RpcError) as failure:
                stub.ModelInfer(_x_request(parameters))
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
            assert text in failure.value.details(), (label, failure.value.details())
        # data both in the request and in shared memory
        request = _x_request(region)
        request.inputs[0].contents.fp32_contents.extend([0.0] * 8)
        with pytest.raises(grpc.RpcError, match="has data in the request and shared memory"):
            stub.ModelInfer(request)
        # raw entries only for inputs not in shared memory
        request = pb.ModelInferRequest(model_name="echo")
        for datatype in ECHO_TYPES:
            request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[1, 2])
            request.raw_input_contents.append(b"\0" * 16 if datatype != "BYTES" else
                                              b"\0" * 8)
        for key_name, value in {"shared_memory_region": _s("h"),
                                 "shared_memory_byte_size": _i(8)}.items():
            request.inputs[list(ECHO_TYPES).index("FP32")].parameters[key_name].CopyFrom(value)
        with pytest.raises(grpc.RpcError, match="raw_input_contents has 13 entries but the "
                           "request has 12 inputs not in shared memory; send one per input "
                           "not in shared memory"):
            stub.ModelInfer(request)
        # classification and shared memory on one output
        request = _x_request(region, output_parameters={**region,
                                                        "classification": _i(2)})
        with pytest.raises(grpc.RpcError, match="'classification' and 'shared_memory_region' "
                           "cannot be combined"):
            stub.ModelInfer(request)
        # after all that, the region still serves
        answer = stub.ModelInfer(_x_request(region))
        y = np.frombuffer(answer.raw_output_contents[0], np.float32)
        assert (y == 2).all()
        for bad_key in ("/a/b", "/..", "x\0y", "", "/" + "k" * 300):
            with pytest.raises(grpc.RpcError) as failure:
                _register(stub, "bad", bad_key)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad_key
        with pytest.raises(grpc.RpcError) as failure:
            _register(stub, "", key)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as failure:
            _register(stub, "zero", key, byte_size=0)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as failure:
            _register(stub, "wide", key, byte_size=2**64 - 1, offset=2**64 - 1)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="h"))
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_server_metadata_lists_the_extension(stub) -> None:
    extensions = stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
    assert "system_shared_memory" in extensions
    assert "cuda_shared_memory" not in extensions


def test_regions_are_unmapped_at_exit(tmp_path: Path, block: mpshm.SharedMemory) -> None:
    build_test_models(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log", *GRPC_ONLY)
    key = "/" + block.name.lstrip("/")
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            _register(stub, "a", key, 64)
            _register(stub, "b", key, 64, offset=64)
        assert _mappings(server.pid, key) == 2
    finally:
        assert server.stop() == 0
    assert "unregistered 2 shared memory region(s) at exit" in server.output()


def test_the_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnxserve.benchmarks.shared_memory import main

    build_test_models(tmp_path)
    main(["--model-repository", str(tmp_path), "--model", "scores", "--batch", "4",
          "--seconds", "0.2", "--rounds", "1", "--out", str(tmp_path / "table.md")])
    table = (tmp_path / "table.md").read_text()
    assert table == capsys.readouterr().out
    for row in ("raw onnxruntime", "served, raw", "served, shm in |", "served, shm in+out"):
        assert row in table
