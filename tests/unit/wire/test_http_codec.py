"""The REST binding's tensors (serving/frontends/http_codec.py): every datatype round-trips
as JSON and as binary data, and malformed requests are refused with a message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxserve.protos.codec import TensorCodecError, encode_raw
from onnxserve.protos.datatypes import DATATYPES, by_name
from onnxserve.serving.contract import InferResult
from onnxserve.serving.errors import InvalidInputError
from onnxserve.serving.frontends.http_codec import (
    header_length,
    infer_request,
    infer_response,
    json_tensor,
    parse_header,
)


def _sample(datatype: str) -> np.ndarray:
    """A [2, 3] array of ``datatype`` with its extremes where it has them."""
    if datatype == "BYTES":
        return np.array([[b"", b"a", "é".encode()], [b"xyz", b"0", b" "]], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    dtype = by_name(datatype).numpy
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, 2, info.max - 1]], dtype=dtype)
    return np.array([[-1.5, 0.0, 3.25], [1e-3, np.finfo(dtype).max, -2]], dtype=dtype)


def _round_trip(array: np.ndarray, datatype: str, binary: bool) -> np.ndarray:
    """``array`` sent in a request and answered back, both ways as JSON or binary."""
    entry: dict = {"name": "t", "datatype": datatype, "shape": list(array.shape)}
    raw = b""
    if binary:
        raw = encode_raw(array, by_name(datatype))
        entry["parameters"] = {"binary_data_size": len(raw)}
    else:
        data = array.tolist()
        entry["data"] = [[v.decode() for v in row] for row in data] \
            if datatype == "BYTES" else data
    header = json.dumps({"inputs": [entry]}).encode()
    parsed = infer_request(parse_header(header), memoryview(raw), "m", "")
    decoded = parsed.request.inputs[0].decode()
    result = InferResult("m", "1", "id-1", [("t", decoded)])
    answer, chunks = infer_response(result, "id-1", lambda name: binary)
    body = json.loads(answer)
    (output,) = body["outputs"]
    assert output["datatype"] == datatype and output["shape"] == list(array.shape)
    if binary:
        assert len(chunks) == 1 and output["parameters"]["binary_data_size"] == len(chunks[0])
        from onnxserve.protos.codec import decode_raw

        return decode_raw(chunks[0], by_name(datatype), output["shape"])
    assert not chunks
    return json_tensor(output["data"], by_name(datatype), tuple(output["shape"]))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_every_datatype_round_trips(datatype: str, binary: bool) -> None:
    array = _sample(datatype)
    back = _round_trip(array, datatype, binary)
    assert back.shape == array.shape
    if datatype == "BYTES":
        assert back.tolist() == array.tolist()
    else:
        assert back.dtype == by_name(datatype).numpy
        np.testing.assert_array_equal(back, array)


def test_nested_and_flat_data_are_the_same_tensor() -> None:
    fp32 = by_name("FP32")
    flat = json_tensor([1, 2, 3, 4, 5, 6], fp32, (2, 3))
    nested = json_tensor([[1, 2, 3], [4, 5, 6]], fp32, (2, 3))
    deeper = json_tensor([[[1], [2], [3]], [[4], [5], [6]]], fp32, (2, 3))
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat, deeper)
    assert json_tensor([], fp32, (0, 3)).shape == (0, 3)


@pytest.mark.parametrize(("data", "datatype", "message"), [
    ([1, 2, 3], "FP32", "data has 3 elements but shape [2, 2] needs 4"),
    ([[1, 2], [3]], "FP32", "ragged"),
    (["1", "2", "3", "4"], "FP32", "FP32 data must be numbers"),
    ([1, None, 2, 3], "FP64", "must be numbers"),
    ([1.5, 2, 3, 4], "INT32", "INT32 data must be integers from -2147483648 to 2147483647"),
    ([1, 2, 3, 300], "UINT8", "integers from 0 to 255"),
    ([-1, 2, 3, 4], "UINT64", "integers from 0"),
    ([2**64, 0, 0, 0], "UINT64", "integers from 0"),
    ([1, 0, 1, 0], "BOOL", "BOOL data must be true or false"),
    ([True, 2, 3, 4], "INT64", "must be numbers, not true or false"),
    ([[1.5, 0.0], [False, 2.0]], "FP32", "must be numbers, not true or false"),
    ([True, False, True, True], "FP32", "FP32 data must be numbers"),
    (["a", 1, "b", "c"], "BYTES", "element 1 is a number"),
    ([{"a": 1}, 1, 2, 3], "INT64", "integers"),
    ("1234", "INT64", "data must be a JSON array, got a string"),
])
def test_json_data_that_does_not_fit_is_refused(data: object, datatype: str,
                                                 message: str) -> None:
    with pytest.raises(TensorCodecError, match=None) as err:
        json_tensor(data, by_name(datatype), (2, 2))
    assert message in str(err.value)


@pytest.mark.parametrize(("value", "length", "message"), [
    ("-5", 10, "must be a non-negative integer"),
    ("abc", 10, "must be a non-negative integer"),
    ("", 10, "must be a non-negative integer"),
    ("\uff11\uff12", 10, "must be a non-negative integer"),  # fullwidth digits
    ("11", 10, "is 11 but the body is only 10 bytes"),
])
def test_lying_header_lengths_are_refused(value: str, length: int, message: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        header_length(value, length)
    assert message in str(err.value)


def test_header_length_absent_or_within_the_body() -> None:
    assert header_length(None, 10) is None
    assert header_length(" 7 ", 10) == 7
    assert header_length("10", 10) == 10


def _input(**fields) -> dict:
    return {"name": "x", "datatype": "FP32", "shape": [1, 2], **fields}


@pytest.mark.parametrize(("header", "binary", "message"), [
    ({}, b"", "inputs must be a non-empty JSON array"),
    ({"inputs": {}}, b"", "inputs must be a non-empty JSON array"),
    ({"inputs": [1]}, b"", "inputs[0] must be a JSON object, got a number"),
    ({"inputs": [_input(name=3, data=[1, 2])]}, b"", "inputs[0].name must be a string"),
    ({"inputs": [_input(shape=[1, -2], data=[1, 2])]}, b"", "non-negative integers"),
    ({"inputs": [_input(shape=[1, True], data=[1])]}, b"", "non-negative integers"),
    ({"inputs": [_input()]}, b"", "has neither data nor binary_data_size"),
    ({"inputs": [_input(data=[1, 2], parameters={"binary_data_size": 8})]}, bytes(8),
     "has both data and binary_data_size"),
    ({"inputs": [_input(parameters={"binary_data_size": 9})]}, bytes(8),
     "binary_data_size 9 goes past the end of the binary data"),
    ({"inputs": [_input(parameters={"binary_data_size": 4})]}, bytes(8),
     "8 bytes of binary data after the JSON header but the inputs' binary_data_size add "
     "up to 4"),
    ({"inputs": [_input(data=[1, 2])]}, bytes(3), "add up to 0"),
    ({"inputs": [_input(parameters={"binary_data_size": "8"})]}, bytes(8),
     "binary_data_size must be a non-negative integer"),
    ({"inputs": [_input(parameters={"binary_data_size": -1})]}, bytes(8),
     "binary_data_size must be a non-negative integer"),
    ({"inputs": [_input(data=[1, 2])], "id": 5}, b"", "id must be a string"),
    ({"inputs": [_input(data=[1, 2])], "parameters": []}, b"", "parameters must be a JSON"),
    ({"inputs": [_input(data=[1, 2])], "parameters": {"binary_data_output": 1}}, b"",
     "'binary_data_output' must be true or false"),
    ({"inputs": [_input(data=[1, 2])], "outputs": {}}, b"", "outputs must be a JSON array"),
    ({"inputs": [_input(data=[1, 2])], "outputs": [{"name": "y", "parameters":
                                                     {"binary_data": "yes"}}]}, b"",
     "'binary_data' must be true or false"),
])
def test_malformed_requests_are_refused(header: dict, binary: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        infer_request(header, memoryview(binary), "m", "")
    assert message in str(err.value)


@pytest.mark.parametrize(("body", "message"), [
    (b"{bad", "is not valid JSON"),
    (b"\xff\xfe\x00", "is not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got an array"),
    (b"[" * 100_000 + b"]" * 100_000, "nests JSON arrays or objects too deeply"),
])
def test_bodies_that_are_not_a_json_object_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        parse_header(body)
    assert message in str(err.value)


def test_outputs_binary_per_output_or_by_request_default() -> None:
    entry = _input(data=[1, 2])
    parsed = infer_request({"inputs": [entry], "parameters": {"binary_data_output": True},
                            "outputs": [{"name": "a"}, {"name": "b", "parameters": {
                                "binary_data": False, "classification": 2}}]},
                           memoryview(b""), "m", "3")
    assert parsed.binary("a") and not parsed.binary("b") and parsed.binary("unlisted")
    assert [(o.name, o.classification) for o in parsed.request.outputs] == [("a", None),
                                                                          ("b", 2)]
    assert parsed.request.model_version == "3" and parsed.request.protocol == "http"
    plain = infer_request({"inputs": [entry]}, memoryview(b""), "m", "")
    assert not plain.binary("a") and plain.request.outputs == []


def test_bytes_outputs_that_are_not_text_need_binary() -> None:
    result = InferResult("m", "1", "i", [("t", np.array([b"\xff\xfe"], dtype=object))])
    with pytest.raises(InvalidInputError, match="not UTF-8 text"):
        infer_response(result, "i", lambda name: False)
    header, chunks = infer_response(result, "i", lambda name: True)
    assert chunks == [b"\x02\x00\x00\x00\xff\xfe"]
    assert json.loads(header)["outputs"][0]["parameters"] == {"binary_data_size": 6}


def test_binary_inputs_are_views_of_the_body() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = bytearray(array.tobytes())
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                          "parameters": {"binary_data_size": len(body)}}]}
    decoded = infer_request(header, memoryview(body), "m", "").request.inputs[0].decode()
    body[0:4] = np.float32(42).tobytes()
    assert decoded[0, 0] == 42  # no copy was made


@pytest.mark.parametrize(("text", "datatype", "message"), [
    ("[70000, 1e6, -1e5, 1]", "FP16", "FP16 data must be numbers from -65504 to 65504 (or "
                                      "NaN, Infinity, -Infinity); element 0 is 70000"),
    ("[1, -65520, 0, 0]", "FP16", "element 1 is -65520, beyond FP16's range"),
    ("[1, 2, 3, 1e39]", "FP32", "element 3 is 1e+39, beyond FP32's range"),
    ("[1, 2, 3, -3.5e38]", "FP32", "from -3.4028235e+38 to 3.4028235e+38"),
    ("[1e400, 2, 3, 4]", "FP64", "element 0 is a number too large for a double"),
    (f"[1, 2, 3, {2**200}]", "FP32", "element 3 is 16069380442589902755...(61 digits)"),
    (f"[1, 2, 3, -{10**400}]", "FP64", "element 3 is -1000000000000000000...(402 digits)"),
    (f"[true, 2, 3, {2**70}]", "FP32", "must be numbers; element 0 is a boolean"),
    (f"[null, 2, 3, {2**70}]", "FP32", "must be numbers; element 0 is null"),
])
def test_json_floats_beyond_their_type_are_refused(text: str, datatype: str,
                                                   message: str) -> None:
    """Never rounded to infinity (issue 21, item 6): the range is named, as for integers."""
    data = parse_header(f'{{"data": {text}}}'.encode())["data"]
    with pytest.raises(TensorCodecError) as err:
        json_tensor(data, by_name(datatype), (2, 2))
    assert message in str(err.value)


@pytest.mark.parametrize(("text", "datatype", "expected"), [
    ("[65504, -65504, 0.5, 1]", "FP16", [65504, -65504, 0.5, 1]),
    (f"[{2**70}, {-2**64}, 1, 2]", "FP32", [2.0**70, -2.0**64, 1, 2]),  # past int64
    (f"[{2**70}, 1e308, 1, 2]", "FP64", [2.0**70, 1e308, 1, 2]),
    ("[NaN, Infinity, -Infinity, 1]", "FP16", [np.nan, np.inf, -np.inf, 1]),
    ("[NaN, Infinity, -Infinity, 1]", "FP64", [np.nan, np.inf, -np.inf, 1]),
])
def test_json_floats_within_their_type_or_spelt_infinite_are_taken(
        text: str, datatype: str, expected: list[float]) -> None:
    data = parse_header(f'{{"data": {text}}}'.encode())["data"]
    array = json_tensor(data, by_name(datatype), (2, 2))
    assert array.dtype == by_name(datatype).numpy
    np.testing.assert_array_equal(array.ravel(), np.array(expected, array.dtype))
