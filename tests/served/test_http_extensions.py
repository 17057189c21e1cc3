"""Triton's extensions over HTTP/REST against a real server: system shared memory with the
official tritonclient.http (sync and aio) and tritonclient.utils.shared_memory, unchanged;
log settings; tracing and CUDA shared memory answered 501; hostile bodies and parameters."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from collections.abc import Iterator
from multiprocessing import shared_memory as mpshm

import grpc
import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm
from support import http_calls
from support.http_calls import Answer
from support.onnx_models import ECHO_TYPES
from tritonclient import http as triton
from tritonclient.http import aio as triton_aio
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.protos.datatypes import by_name
from onnxserve.serving.process import ServerProcess

CUDA_MESSAGE = "CUDA shared memory is not supported"


@pytest.fixture(scope="module")
def http_server(test_models_server: ServerProcess) -> ServerProcess:
    return test_models_server


@pytest.fixture
def client(http_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    assert http_server.http_url is not None
    client = triton.InferenceServerClient(http_server.http_url)
    yield client
    client.unregister_system_shared_memory()
    client.close()


def _key(block: mpshm.SharedMemory) -> str:
    return "/" + block.name.lstrip("/")


def _failure(call) -> tuple[str, str]:
    """The HTTP status and message of a tritonclient call that must fail."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def _x(region: str, byte_size: int = 32, offset: int = 0) -> triton.InferInput:
    tensor = triton.InferInput("x", [2, 4], "FP32")
    tensor.set_shared_memory(region, byte_size, offset=offset)
    return tensor


def test_tritonclient_http_uses_system_shared_memory(client, http_server) -> None:
    tag = os.getpid()
    in_key, out_key = f"/onnxserve_http_in_{tag}", f"/onnxserve_http_out_{tag}"
    in_handle = shm.create_shared_memory_region("in", in_key, 4096)
    out_handle = shm.create_shared_memory_region("out", out_key, 4096)
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        shm.set_shared_memory_region(in_handle, [x])
        shm.set_shared_memory_region(in_handle, [x * 10], offset=64)
        client.register_system_shared_memory("in", in_key, 4096)
        client.register_system_shared_memory("out", out_key, 2048, offset=1024)
        status = client.get_system_shared_memory_status()
        assert sorted(status, key=lambda r: r["name"]) == [
            {"name": "in", "key": in_key, "offset": 0, "byte_size": 4096},
            {"name": "out", "key": out_key, "offset": 1024, "byte_size": 2048}]
        assert client.get_system_shared_memory_status("out") == [
            {"name": "out", "key": out_key, "offset": 1024, "byte_size": 2048}]

        # add_one (y = x + 1, z = 2x): x from "in", y into "out" at 16, z as binary data
        for offset, scale in ((0, 1), (64, 10)):
            y = triton.InferRequestedOutput("y")
            y.set_shared_memory("out", 32, offset=16)
            result = client.infer("add_one", [_x("in", offset=offset)],
                                  outputs=[y, triton.InferRequestedOutput("z")])
            written = shm.get_contents_as_numpy(out_handle, np.float32, [2, 4],
                                                offset=1024 + 16)
            assert written.tolist() == (x * scale + 1).tolist()
            assert result.as_numpy("z").tolist() == (x * scale * 2).tolist()
            # as Triton answers over HTTP: no data, no parameters
            assert result.get_output("y") == {"name": "y", "datatype": "FP32", "shape": [2, 4]}

        # echo: BYTES and INT32 from "in", the others as binary or JSON data; out_BYTES
        # and out_FP16 into "out", the others back as data
        text = np.array([[b"hello", b""], [b"x", b"yz"]], dtype=object)
        ints = np.array([[1, -2], [3, -4]], dtype=np.int32)
        serialized = serialize_byte_tensor(text)
        shm.set_shared_memory_region(in_handle, [serialized], offset=256)
        shm.set_shared_memory_region(in_handle, [ints], offset=512)
        inputs = []
        for name in ECHO_TYPES:
            tensor = triton.InferInput(f"in_{name}", [2, 2], name)
            if name == "INT32":
                tensor.set_shared_memory("in", ints.nbytes, offset=512)
            elif name == "BYTES":
                tensor.set_shared_memory("in", len(serialized.item()), offset=256)
            else:
                tensor.set_data_from_numpy(np.eye(2, dtype=by_name(name).numpy),
                                           binary_data=name != "FP64")
            inputs.append(tensor)
        outputs = []
        for name in ECHO_TYPES:
            output = triton.InferRequestedOutput(f"out_{name}")
            if name == "BYTES":
                output.set_shared_memory("out", 64)
            elif name == "FP16":
                output.set_shared_memory("out", 8, offset=128)
            outputs.append(output)
        result = client.infer("echo", inputs, outputs=outputs)
        assert result.get_output("out_BYTES") == {"name": "out_BYTES", "datatype": "BYTES",
                                                  "shape": [2, 2]}
        assert shm.get_contents_as_numpy(out_handle, np.object_, [2, 2],
                                         offset=1024).tolist() == text.tolist()
        assert shm.get_contents_as_numpy(out_handle, np.float16, [2, 2],
                                         offset=1024 + 128).tolist() == [[1, 0], [0, 1]]
        assert result.as_numpy("out_INT32").tolist() == ints.tolist()
        assert result.as_numpy("out_FP64").tolist() == [[1, 0], [0, 1]]
        assert result.as_numpy("out_BOOL").tolist() == [[True, False], [False, True]]

        # regions are per server process, whatever the transport: gRPC sees them too
        with grpc.insecure_channel(http_server.url) as channel:
            listed = inference_pb2_grpc.GRPCInferenceServiceStub(channel)\
                .SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
        assert sorted(listed.regions) == ["in", "out"]

        client.unregister_system_shared_memory("in")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
        assert _failure(lambda: client.infer("add_one", [_x("in")])) == (
            "404", "no system shared memory region 'in' is registered (registered: 'out')")
        client.unregister_system_shared_memory("in")  # not registered: no error, as Triton
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def test_tritonclient_http_aio_uses_system_shared_memory(http_server, block) -> None:
    key = _key(block)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    block.buf[:32] = x.tobytes()

    async def session() -> tuple[list, dict]:
        client = triton_aio.InferenceServerClient(http_server.http_url)
        try:
            await client.register_system_shared_memory("io", key, 4096)
            status = await client.get_system_shared_memory_status("io")
            tensor = triton_aio.InferInput("x", [2, 4], "FP32")
            tensor.set_shared_memory("io", 32)
            y = triton_aio.InferRequestedOutput("y")
            y.set_shared_memory("io", 32, offset=2048)
            result = await client.infer("add_one", [tensor], outputs=[y])
            await client.unregister_system_shared_memory("io")
            assert await client.get_system_shared_memory_status() == []
            return status, result.get_output("y")
        finally:
            await client.close()

    status, output = asyncio.run(session())
    assert status == [{"name": "io", "key": key, "offset": 0, "byte_size": 4096}]
    assert output == {"name": "y", "datatype": "FP32", "shape": [2, 4]}
    y = np.frombuffer(block.buf[2048:2080], np.float32).reshape(2, 4)
    assert y.tolist() == (x + 1).tolist()


def test_shared_memory_errors_over_http(client, block) -> None:
    key = _key(block)
    client.register_system_shared_memory("h", key, 4096)
    y = triton.InferRequestedOutput("y")
    y.set_shared_memory("h", 32, offset=4080)
    small = triton.InferRequestedOutput("y")
    small.set_shared_memory("h", 16)
    expected = {
        "unregistered region": (lambda: client.infer("add_one", [_x("nope")]), "404",
                                "no system shared memory region 'nope' is registered"),
        "offset past the region": (lambda: client.infer("add_one", [_x("h", offset=4090)]),
                                   "400", "input 'x': shared_memory_offset 4090 + "
                                   "shared_memory_byte_size 32 = 4122 runs past the end of "
                                   "shared memory region 'h' (4096 bytes)"),
        "size not the tensor's": (lambda: client.infer("add_one", [_x("h", byte_size=16)]),
                                  "400", "input 'x': shared_memory_byte_size is 16 but shape "
                                  "[2, 4] of FP32 needs 32 bytes"),
        "output past the region": (lambda: client.infer("add_one", [_x("h")], outputs=[y]),
                                   "400", "output 'y': shared_memory_offset 4080"),
        "output region too small": (
            lambda: client.infer("add_one", [_x("h")], outputs=[small]), "400",
            "output 'y' needs 32 bytes (FP32 [2, 4]) but its shared memory placement in "
            "region 'h' has shared_memory_byte_size 16"),
        "registered twice": (lambda: client.register_system_shared_memory("h", key, 64),
                             "409", "shared memory region 'h' is already registered"),
        "no such object": (lambda: client.register_system_shared_memory(
            "g", f"/onnxserve_absent_{os.getpid()}", 64), "404",
            "no POSIX shared memory object has key"),
        "past the object": (lambda: client.register_system_shared_memory(
            "g", key, 4096, offset=8), "400", "offset 8 + byte_size 4096 = 4104 is past the "
            "end of shared memory object"),
        "a path for a key": (lambda: client.register_system_shared_memory("g", "/a/b", 64),
                             "400", "is not a POSIX shared memory name"),
        "status of an unknown region": (
            lambda: client.get_system_shared_memory_status("nope"), "404",
            "no system shared memory region 'nope' is registered (registered: 'h')"),
        "CUDA register": (lambda: client.register_cuda_shared_memory("c", b"\0" * 64, 0, 64),
                          "501", CUDA_MESSAGE),
        "CUDA status": (lambda: client.get_cuda_shared_memory_status(), "501", CUDA_MESSAGE),
        "CUDA unregister": (lambda: client.unregister_cuda_shared_memory("c"), "501",
                            CUDA_MESSAGE),
    }
    for label, (call, status, text) in expected.items():
        got_status, message = _failure(call)
        assert got_status == status, (label, got_status, message)
        assert text in message, (label, message)
    # after all that, the region still serves
    block.buf[:32] = np.ones(8, np.float32).tobytes()
    z = client.infer("add_one", [_x("h")]).as_numpy("z")
    assert z.tolist() == [[2.0] * 4] * 2


def _call(server: ServerProcess, method: str, path: str,
          body: bytes | dict | None = None) -> Answer:
    return http_calls.call(server, method, path, body)


@pytest.mark.parametrize(("body", "message"), [
    (b"{", "the request body is not valid JSON"),
    (b"[]", "the request body must be a JSON object, got an array"),
    (b"", "registering shared memory region 'r': no 'key' or 'byte_size'"),
    ({"key": "/k"}, "no 'byte_size'"),
    ({"key": "/k", "byte_size": 8, "bytesize": 8}, "unknown field(s) 'bytesize'"),
    ({"key": 5, "byte_size": 8}, "shared memory region 'r': key must be a string, got 5"),
    ({"key": "/k", "byte_size": "8"}, "byte_size must be an integer >= 1, got '8'"),
    ({"key": "/k", "byte_size": 0}, "byte_size must be an integer >= 1, got 0"),
    ({"key": "/k", "byte_size": 8, "offset": -1}, "offset must be an integer >= 0, got -1"),
    ({"key": "/k", "byte_size": 8, "offset": True}, "offset must be an integer >= 0, got True"),
    ({"key": "/k", "byte_size": 1.5}, "byte_size must be an integer >= 1, got 1.5"),
    ({"key": "/..", "byte_size": 8}, "is not a POSIX shared memory name"),
])
def test_bad_register_bodies_get_400(http_server, body, message) -> None:
    answer = _call(http_server, "POST", "/v2/systemsharedmemory/region/r/register", body)
    assert answer.status == 400, answer.body
    assert message in answer.error, answer.error
    assert _call(http_server, "GET", "/v2/systemsharedmemory/status").body == b"[]"


def test_hostile_shared_memory_parameters_over_http(http_server, client, block) -> None:
    client.register_system_shared_memory("h", _key(block), 4096)
    block.buf[:32] = np.ones(8, np.float32).tobytes()
    region = {"shared_memory_region": "h", "shared_memory_byte_size": 32}

    def infer(x: dict, y: dict | None = None) -> Answer:
        request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], **x}]}
        if y is not None:
            request["outputs"] = [{"name": "y", **y}]
        return _call(http_server, "POST", "/v2/models/add_one/infer", request)

    cases = {
        "region as a number": ({"parameters": {"shared_memory_region": 3,
                                               "shared_memory_byte_size": 32}}, None,
                               "'shared_memory_region' must be a region's name"),
        "size as a string": ({"parameters": {"shared_memory_region": "h",
                                             "shared_memory_byte_size": "32"}}, None,
                             "'shared_memory_byte_size' must be an integer >= 0, got '32'"),
        "size as a float": ({"parameters": {"shared_memory_region": "h",
                                            "shared_memory_byte_size": 32.0}}, None,
                            "'shared_memory_byte_size' must be an integer >= 0, got 32.0"),
        "negative offset": ({"parameters": {**region, "shared_memory_offset": -8}}, None,
                            "'shared_memory_offset' must be an integer >= 0, got -8"),
        "huge offset": ({"parameters": {**region, "shared_memory_offset": 2**62}}, None,
                        "runs past the end"),
        "offset alone": ({"parameters": {"shared_memory_offset": 0}}, None,
                         "can only be given with 'shared_memory_region'"),
        "no size": ({"parameters": {"shared_memory_region": "h"}}, None,
                    "'shared_memory_byte_size' must be given with"),
        "JSON data too": ({"parameters": region, "data": [0.0] * 8}, None,
                          "has data in the request and shared memory parameters"),
        "classification too": ({"parameters": region},
                               {"parameters": {**region, "classification": 2}},
                               "'classification' and 'shared_memory_region' cannot be combined"),
        "output region unknown": ({"parameters": region},
                                  {"parameters": {"shared_memory_region": "nope",
                                                  "shared_memory_byte_size": 32}},
                                  "no system shared memory region 'nope'"),
    }
    for label, (x, y, text) in cases.items():
        answer = infer(x, y)
        assert answer.status in (400, 404), (label, answer.status, answer.body)
        assert text in answer.error, (label, answer.error)

    # binary data as well as shared memory parameters: refused, the body still parsed
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                     "parameters": {**region, "binary_data_size": 32}}]})
    assert http_server.http_url is not None
    host, port = http_server.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v2/models/add_one/infer",
                           header.encode() + bytes(32),
                           {"Inference-Header-Content-Length": str(len(header))})
        answer = Answer(connection.getresponse())
    finally:
        connection.close()
    assert answer.status == 400
    assert "has data in the request and shared memory parameters" in answer.error
    # JSON outputs beside an input in shared memory
    answer = infer({"parameters": region})
    assert answer.status == 200, answer.body
    assert json.loads(answer.body)["outputs"][0]["data"] == [2.0] * 8


def test_log_settings_over_http(client) -> None:
    settings = client.get_log_settings()
    assert set(settings) == {"log_file", "log_info", "log_warning", "log_error",
                             "log_verbose_level", "log_format"}
    assert settings["log_file"] == "" and settings["log_info"] is True
    try:
        changed = client.update_log_settings({"log_info": False})
        assert changed == {**settings, "log_info": False}
        assert client.get_log_settings() == changed
        status, message = _failure(lambda: client.update_log_settings({"log_colour": True}))
        assert status == "400" and "log_colour" in message
        status, message = _failure(lambda: client.update_log_settings({"log_info": "yes"}))
        assert status == "400" and "log_info" in message
        assert client.get_log_settings() == changed  # a refused change changes nothing
    finally:
        assert client.update_log_settings({"log_info": True}) == settings


def test_log_settings_bodies(http_server) -> None:
    answer = _call(http_server, "POST", "/v2/logging", b"")
    assert answer.status == 200 and json.loads(answer.body)["log_file"] == ""
    for body, text in ((b"{", "not valid JSON"), (b"3", "must be a JSON object")):
        answer = _call(http_server, "POST", "/v2/logging", body)
        assert answer.status == 400 and text in answer.error


def test_trace_settings_bodies(http_server) -> None:
    """Tracing itself: tests/served/test_tracing_served.py. Here, what a body may hold."""
    answer = _call(http_server, "GET", "/v2/trace/setting")
    assert answer.status == 200 and json.loads(answer.body)["trace_level"] == ["OFF"]
    assert json.loads(answer.body)["trace_rate"] == "1000"
    for body, text in ((b"{", "not valid JSON"), (b"[]", "must be a JSON object"),
                       (b'{"trace_rate": 5}', "expected a string, a list of strings or null"),
                       (b'{"trace_level": [1]}', "expected a string, a list of strings"),
                       (b'{"colour": "blue"}', "unknown trace setting 'colour'")):
        answer = _call(http_server, "POST", "/v2/trace/setting", body)
        assert answer.status == 400 and text in answer.error, (body, answer.error)
    answer = _call(http_server, "GET", "/v2/models/no_such_model/trace/setting")
    assert answer.status == 400 and "Request for unknown model : no_such_model" in answer.error


def test_server_metadata_over_http_lists_the_extensions(client) -> None:
    extensions = client.get_server_metadata()["extensions"]
    assert {"logging", "trace", "system_shared_memory", "binary_tensor_data"} <= set(extensions)
    assert "cuda_shared_memory" not in extensions

