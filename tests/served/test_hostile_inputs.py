"""Hostile input: generated malformed requests never crash the server or get a wrong status.

Bounded: 1,000 generated ModelInfer requests (derandomized, so every run sends the same
ones) plus a few hand-made extremes, all to a server on 127.0.0.1 that this module starts.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

#: What a malformed request may get: a clear refusal, or an answer if it happens to be valid.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES"]
MAX_MESSAGE = 4 * 1024 * 1024
#: status codes the generated requests got, checked after they ran
SEEN: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("hostile")
    build_test_models(repository)
    server = start_server(repository, repository / "server.log", "--max-message-bytes",
                          str(MAX_MESSAGE))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(hostile_server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(hostile_server.url, options=options) as ch:
        yield ch


dims = st.one_of(st.integers(-3, 6), st.sampled_from([0, 2**31, 2**40, 2**62, -(2**62)]))
numbers = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def contents(draw) -> pb.InferTensorContents:
    out = pb.InferTensorContents()
    field = draw(st.sampled_from(["fp32_contents", "int_contents", "int64_contents",
                                  "uint_contents", "bool_contents", "bytes_contents",
                                  "fp64_contents", "uint64_contents"]))
    count = draw(st.integers(0, 12))
    values = {
        "fp32_contents": numbers, "fp64_contents": st.floats(),
        "int_contents": st.integers(-(2**31), 2**31 - 1),
        "int64_contents": st.integers(-(2**63), 2**63 - 1),
        "uint_contents": st.integers(0, 2**32 - 1), "uint64_contents": st.integers(0, 2**64 - 1),
        "bool_contents": st.booleans(), "bytes_contents": st.binary(max_size=8),
    }[field]
    getattr(out, field).extend(draw(st.lists(values, max_size=count)))
    return out


@st.composite
def parameter(draw) -> pb.InferParameter:
    out = pb.InferParameter()
    kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param",
                                 "uint64_param", None]))
    if kind == "bool_param":
        out.bool_param = draw(st.booleans())
    elif kind == "int64_param":
        out.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif kind == "string_param":
        out.string_param = draw(st.text(max_size=8))
    elif kind == "double_param":
        out.double_param = draw(st.floats())
    elif kind == "uint64_param":
        out.uint64_param = draw(st.integers(0, 2**64 - 1))
    return out


@st.composite
def near_valid(draw) -> pb.ModelInferRequest:
    """A valid add_one request with one to three things broken."""
    batch = draw(st.integers(1, 3))
    request = pb.ModelInferRequest(model_name="add_one", id=draw(st.text(max_size=8)))
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[batch, 4])
    values = np.array(draw(st.lists(numbers, min_size=4 * batch, max_size=4 * batch)),
                      np.float32)
    raw = values.tobytes()
    for mutation in draw(st.lists(st.sampled_from(
            ["none", "truncate", "extend", "dtype", "shape", "huge", "typed", "both", "extra",
             "name", "version", "timeout", "classification", "output", "zero"]),
            min_size=1, max_size=3)):
        if mutation == "truncate":
            raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
        elif mutation == "extend":
            raw += draw(st.binary(min_size=1, max_size=8))
        elif mutation == "dtype":
            tensor.datatype = draw(st.sampled_from([*DATATYPES, "", "FP8"]))
        elif mutation == "shape":
            tensor.shape[:] = draw(st.lists(dims, max_size=4))
        elif mutation == "huge":
            tensor.shape[:1] = [draw(st.sampled_from([2**31, 2**40, 2**62]))]
        elif mutation == "typed":
            tensor.contents.fp32_contents.extend(values.tolist())
            raw = b""
        elif mutation == "both":
            tensor.contents.fp32_contents.extend(values.tolist())
        elif mutation == "extra":
            request.inputs.add(name=draw(st.sampled_from(["x", "w"])), datatype="FP32",
                               shape=[batch, 4])
        elif mutation == "name":
            tensor.name = draw(st.sampled_from(["X", "", "x ", "scores_in"]))
        elif mutation == "version":
            request.model_version = draw(st.sampled_from(["1", "2", "3", "-1", "two"]))
        elif mutation == "timeout":
            request.parameters["timeout"].CopyFrom(draw(parameter()))
        elif mutation == "classification":
            out = request.outputs.add(name=draw(st.sampled_from(["y", "z", "q"])))
            out.parameters["classification"].CopyFrom(draw(parameter()))
        elif mutation == "output":
            request.outputs.add(name=draw(st.sampled_from(["y", "z", "y", "nope"])))
        elif mutation == "zero":
            tensor.shape[:1] = [0]
    if raw:
        request.raw_input_contents.append(raw)
        if len(request.inputs) > 1 and draw(st.booleans()):
            request.raw_input_contents.append(raw)
    return request


def requests() -> st.SearchStrategy[pb.ModelInferRequest]:
    """Half near-valid requests (they reach decoding and the model), half wild ones."""
    return st.one_of(near_valid(), wild())


@st.composite
def wild(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["add_one", "echo", "scores", "", "nope", "../echo",
                                         "echo\x00", "a" * 300])),
        model_version=draw(st.sampled_from(["", "", "", "1", "2", "-1", "x", "1" * 30])),
        id=draw(st.text(max_size=20)),
    )
    names = ["x", "scores_in", "in_FP32", "in_BYTES", "in_BOOL", "in_FP16", "", "zz"]
    raw_mode = draw(st.sampled_from(["raw", "contents", "both", "none"]))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(names)),
            datatype=draw(st.sampled_from([*DATATYPES, "", "FP8", "fp32"])),
            shape=draw(st.lists(dims, max_size=4)),
        )
        if raw_mode in ("contents", "both"):
            tensor.contents.CopyFrom(draw(contents()))
        if raw_mode in ("raw", "both"):
            request.raw_input_contents.append(draw(st.binary(max_size=96)))
        if draw(st.booleans()):
            tensor.parameters[draw(st.text(max_size=6))].CopyFrom(draw(parameter()))
    if draw(st.booleans()):  # a raw entry too many
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["y", "z", "scores", "nope",
                                                                "out_FP32", ""])))
        if draw(st.booleans()):
            output.parameters["classification"].CopyFrom(draw(parameter()))
    for key in draw(st.lists(st.sampled_from(["timeout", "priority", "sequence_id", "x"]),
                             max_size=2)):
        request.parameters[key].CopyFrom(draw(parameter()))
    return request


def _status(stub, request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    try:
        stub.ModelInfer(request, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _valid_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_one")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.arange(8, dtype=np.float32).tobytes())
    return request


def _still_correct(stub) -> None:
    response = stub.ModelInfer(_valid_request(), timeout=20)
    y = np.frombuffer(response.raw_output_contents[0], np.float32)
    assert y.tolist() == [float(v + 1) for v in range(8)]


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(request=requests())
def test_generated_malformed_requests_get_clear_statuses(channel, request) -> None:
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    code, details = _status(stub, request)
    SEEN[code.name] += 1
    assert code in ALLOWED, f"{code.name}: {details}\n{request}"
    if code != grpc.StatusCode.OK:
        assert details  # every refusal says why


def test_the_server_survived_and_still_answers_correctly(channel, hostile_server) -> None:
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    _still_correct(stub)
    assert hostile_server.process.poll() is None
    if sum(SEEN.values()) >= 1000:  # the generated requests ran first: they reached deep
        assert SEEN["INVALID_ARGUMENT"] > 200 and SEEN["NOT_FOUND"] > 50, SEEN
        assert SEEN["OK"] > 0, SEEN
    assert "Traceback" not in hostile_server.output()


@pytest.mark.parametrize("case", ["oversized", "huge-dims", "count-overflow", "bytes-lengths",
                                  "nan-inf", "empty-batch"])
def test_extreme_requests(channel, case: str) -> None:
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="add_one")
    expected = grpc.StatusCode.INVALID_ARGUMENT
    if case == "oversized":
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * (MAX_MESSAGE + 1024))
        expected = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif case == "huge-dims":
        request.inputs.add(name="x", datatype="FP32", shape=[2**62, 2**62])
        request.raw_input_contents.append(b"\0" * 16)
    elif case == "count-overflow":  # elements overflow int64 only when multiplied
        request.inputs.add(name="x", datatype="FP32", shape=[2**40, 4])
        request.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    elif case == "bytes-lengths":  # a BYTES element claiming 4 GB
        request.model_name = "echo"
        request.inputs.add(name="in_BYTES", datatype="BYTES", shape=[1, 2])
        request.raw_input_contents.append(b"\xff\xff\xff\xff" + b"abc")
    elif case == "nan-inf":
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        values = np.array([np.nan, np.inf, -np.inf, 1], np.float32)
        request.raw_input_contents.append(values.tobytes())
        response = stub.ModelInfer(request, timeout=20)
        y = np.frombuffer(response.raw_output_contents[0], np.float32)
        assert math.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf and y[3] == 2
        return
    elif case == "empty-batch":
        request.inputs.add(name="x", datatype="FP32", shape=[0, 4])
        request.raw_input_contents.append(b"")
    code, details = _status(stub, request)
    assert code == expected, f"{code.name}: {details}"
    _still_correct(stub)


def test_hostile_log_stays_free_of_tracebacks(hostile_server) -> None:
    assert "Traceback" not in Path(hostile_server.log_path).read_text()
