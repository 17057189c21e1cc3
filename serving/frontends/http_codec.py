"""Inference requests and responses of the KServe V2 REST binding, with Triton's binary
tensor extension, as the data plane's values.

A request body is a JSON object (the inference header), optionally followed by binary
tensor data; the header's length in bytes is then in the HTTP header
``Inference-Header-Content-Length`` (absent: the whole body is JSON). Each input carries
either ``data`` (JSON values, flat in row-major order or nested) or
``"parameters": {"binary_data_size": N}``: the next N bytes of the binary section, in the
order of the inputs, laid out as gRPC's raw contents (protos/codec.py: little-endian,
BOOL one byte each, BYTES elements each a 4-byte little-endian length and the bytes).

JSON data per datatype: BOOL true/false; UINT8..UINT64 and INT8..INT64 integers in the
type's range; FP16, FP32, FP64 numbers within the type's finite range (a larger one is
refused, never rounded to infinity; NaN, Infinity and -Infinity when spelt so, Python's
extension to JSON that the answers use too); BYTES strings (sent as their UTF-8 bytes).
FP16 is accepted in JSON, where Triton refuses it ("receiving FP16 data via JSON is not
supported"): its range is checked like any other type's. BF16 has no JSON form and is
refused as everywhere else (protos/datatypes.py).

Outputs come back as JSON ``data`` (flat, row-major; BYTES as strings) unless the request
asks for binary: per output ``"parameters": {"binary_data": true}``, or for every output
without that parameter ``"parameters": {"binary_data_output": true}`` on the request. A
binary output has ``"parameters": {"binary_data_size": N}`` and its bytes follow the JSON
header in the order of the outputs.

Triton's system shared memory parameters (``shared_memory_region``,
``shared_memory_byte_size``, ``shared_memory_offset``; serving/shared_memory.py) place an
input in a registered region instead of ``data`` or the binary section, and ask for an
output to be written into one: its answer then has only its name, datatype and shape, no
parameters and no data, as Triton's HTTP answers do (Triton's C++ client, perf_analyzer's,
reads ``binary_data_size`` from every output that has parameters; over gRPC the answer
carries the placement).

Nothing here knows HTTP or a web framework: bodies in, bodies out, and malformed requests
raised as InvalidInputError (the front end answers 400) or, inside an input's ``decode``,
TensorCodecError (the data plane names the input).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from onnxserve.protos.codec import (
    TensorCodecError,
    datatype_of,
    decode_raw,
    element_count,
    encode_raw,
)
from onnxserve.protos.datatypes import Datatype, by_numpy
from onnxserve.protos.naming import plain_int
from onnxserve.serving.contract import (
    CLASSIFICATION_PARAMETER,
    TIMEOUT_PARAMETER,
    InferRequest,
    InferResult,
    RequestedOutput,
    RequestInput,
)
from onnxserve.serving.errors import InvalidInputError
from onnxserve.serving.shared_memory import in_region, shared_memory_parameters

#: the HTTP header that carries the JSON header's length when binary data follows it
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"

_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclass(slots=True)
class HttpInferRequest:
    """A parsed request: the data plane's request, the id as sent ("" if none), and which
    outputs go back as binary data."""

    request: InferRequest
    sent_id: str
    binary: Callable[[str], bool]


def _fail(message: str) -> InvalidInputError:
    return InvalidInputError(message)


def _object(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{what} must be a string, got {_json_type(value)}")
    return value


def _flag(parameters: dict, key: str, what: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise _fail(f"{what} parameter {key!r} must be true or false, got {value!r}")
    return value


class _NonFinite(float):
    """NaN, Infinity or -Infinity as the JSON text spelt them (Python's extension to JSON,
    which the answers use too), told apart from a number too large for a double, which
    JSON parsers also read as infinity."""

    __slots__ = ()


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", _NonFinite: "a number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def header_length(value: str | None, body_length: int) -> int | None:
    """The JSON header's length from ``Inference-Header-Content-Length`` (None when absent:
    the body is all JSON). Raises InvalidInputError for a value that is not a whole number
    of bytes within the body."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise _fail(f"{HEADER_LENGTH} must be a non-negative integer (the JSON header's "
                    f"length in bytes), got {value[:40]!r}")
    length = plain_int(text, body_length)  # int() would raise past 4300 digits
    if length is None:
        raise _fail(f"{HEADER_LENGTH} is {text[:40]} but the body is only {body_length} bytes")
    return length


def parse_header(body: bytes | memoryview, what: str = "the request body") -> dict:
    """A JSON object from ``body``; InvalidInputError for anything else."""
    try:
        value = json.loads(bytes(body), parse_constant=_NonFinite)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise _fail(f"{what} nests JSON arrays or objects too deeply") from None
    if not isinstance(value, dict):
        raise _fail(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _shape(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise _fail(f"input {name!r}: shape must be an array of non-negative integers, got "
                    f"{json.dumps(value)[:100]}")
    return tuple(value)


def json_tensor(data: object, datatype: Datatype, shape: tuple[int, ...]) -> np.ndarray:
    """The array of ``shape`` that JSON ``data`` (flat or nested) holds.

    Raises:
        TensorCodecError: data is not an array, is ragged, holds values of the wrong kind
            for ``datatype`` or out of its range, or has not ``prod(shape)`` elements.
    """
    count = element_count(shape)
    if not isinstance(data, list):
        raise TensorCodecError(f"data must be a JSON array, got {_json_type(data)}")
    try:
        array = np.array(data, dtype=object if datatype.name == "BYTES" else None)
    except ValueError:
        raise TensorCodecError("data is ragged: nested arrays must have equal lengths") from None
    if array.size != count:
        raise TensorCodecError(f"data has {array.size} elements but shape {list(shape)} needs "
                               f"{count}")
    if count == 0:
        return np.empty(shape, dtype=datatype.numpy)
    kind = array.dtype.kind
    name = datatype.name
    if name == "BYTES":
        flat = array.ravel()
        out = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise TensorCodecError(f"BYTES data must be strings; element {i} is "
                                       f"{_json_type(item)}")
            out[i] = item.encode("utf-8")
        return out.reshape(shape)
    if name == "BOOL":
        if kind != "b":
            raise TensorCodecError("BOOL data must be true or false values")
        return array.reshape(shape)
    if kind in "iuf" and any(type(v) is bool for v in np.array(data, dtype=object).flat):
        # numpy reads true/false among numbers as 1/0: refuse rather than guess
        raise TensorCodecError(f"{name} data must be numbers, not true or false")
    if datatype.numpy.kind in "iu":
        info = np.iinfo(datatype.numpy)
        wrong = TensorCodecError(f"{name} data must be integers from {info.min} to "
                                 f"{info.max}")
        if kind not in "iu":
            # numpy reads integers of both signs past int64 as float64 (inexact): look
            # at the values themselves
            values = np.array(data, dtype=object).ravel().tolist()
            if not all(type(v) is int for v in values):
                raise wrong
            if min(values) < info.min or max(values) > info.max:
                raise wrong
            return np.array(values, dtype=datatype.numpy).reshape(shape)
        if array.min() < info.min or array.max() > info.max:
            raise wrong
        return array.astype(datatype.numpy).reshape(shape)
    return _floats(data, array, datatype).reshape(shape)


def _floats(data: object, array: np.ndarray, datatype: Datatype) -> np.ndarray:
    """``array`` (numpy's reading of JSON ``data``) as FP16, FP32 or FP64 values.

    A number too large for the type (one that would round to infinity) is refused, with
    the type's range: 70000 as FP16, 1e39 as FP32, and 1e400 (which JSON parsers read as
    infinity) as any.
    NaN, Infinity and -Infinity spelt so (Python's JSON extension, which the answers use
    too; parse_header marks them) stay what they say. Integers past int64, which numpy
    keeps as Python objects, are converted one by one.

    Raises:
        TensorCodecError: an element is not a number, or is beyond the type's range.
    """
    name = datatype.name
    top = float(np.finfo(datatype.numpy).max)
    largest = repr(top) if datatype.numpy.itemsize == 8 else f"{top:.8g}"  # 65504, 3.4e38
    values: list | None = None

    def beyond(index: int) -> TensorCodecError:
        assert values is not None
        value = values[index]
        if isinstance(value, float) and math.isinf(value):
            shown = "a number too large for a double"
        else:  # integers past int64 may have thousands of digits
            text = repr(value)
            shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"
        return TensorCodecError(
            f"{name} data must be numbers from -{largest} to {largest} (or NaN, Infinity, "
            f"-Infinity); element {index} is {shown}, beyond {name}'s range")

    if array.dtype.kind == "O":  # Python ints too large for int64 among the numbers
        values = array.ravel().tolist()
        floats = []
        for index, value in enumerate(values):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TensorCodecError(f"{name} data must be numbers; element {index} is "
                                       f"{_json_type(value)}")
            try:
                floats.append(float(value))
            except OverflowError:  # beyond even float64
                raise beyond(index) from None
        array = np.array(floats, dtype=np.float64)
    elif array.dtype.kind not in "iuf":
        raise TensorCodecError(f"{name} data must be numbers")
    with np.errstate(over="ignore"):
        out = array.astype(datatype.numpy)
    if not np.isfinite(out).all():  # rare: find infinities the client did not spell
        if values is None:
            values = np.array(data, dtype=object).ravel().tolist()
        for position in np.flatnonzero(np.isinf(out.ravel())).tolist():
            if not isinstance(values[position], _NonFinite):
                raise beyond(position)
    return out


def _decoder(entry: dict, shape: tuple[int, ...],
             binary: memoryview | None) -> Callable[[], np.ndarray]:
    datatype_name = entry["datatype"]

    def decode() -> np.ndarray:
        datatype = datatype_of(datatype_name)
        if binary is not None:
            return decode_raw(binary, datatype, shape)  # type: ignore[arg-type]
        return json_tensor(entry["data"], datatype, shape)

    return decode


def infer_request(header: dict, binary: memoryview, model_name: str,
                  model_version: str) -> HttpInferRequest:
    """The data plane's request for a parsed inference header and the binary section that
    followed it (empty when none). Tensors are decoded only when the data plane calls each
    input's ``decode``; inputs with shared memory parameters are read from their region by
    the data plane (which refuses one that has data too).

    Raises:
        InvalidInputError: the header is not an inference request (fields missing or of the
            wrong type), an input has both of ``data`` and ``binary_data_size``, or neither
            and no shared memory parameters, or the binary sizes do not add up to the binary
            section's length.
    """
    sent_id = header.get("id", "")
    _text(sent_id, "id")
    parameters = _object(header.get("parameters"), "parameters")
    entries = header.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise _fail("inputs must be a non-empty JSON array of input tensors")
    inputs: list[RequestInput] = []
    offset = 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _fail(f"inputs[{index}] must be a JSON object, got {_json_type(entry)}")
        name = _text(entry.get("name"), f"inputs[{index}].name")
        _text(entry.get("datatype"), f"input {name!r}: datatype")
        shape = _shape(entry.get("shape"), name)
        entry_parameters = _object(entry.get("parameters"), f"input {name!r}: parameters")
        size = entry_parameters.get(BINARY_DATA_SIZE)
        placed = shared_memory_parameters(entry_parameters,
                                          with_data=size is not None or "data" in entry)
        view: memoryview | None = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _fail(f"input {name!r}: {BINARY_DATA_SIZE} must be a non-negative "
                            f"integer, got {size!r}")
            if "data" in entry:
                raise _fail(f"input {name!r} has both data and {BINARY_DATA_SIZE}; send "
                            "one or the other")
            if offset + size > len(binary):
                raise _fail(f"input {name!r}: {BINARY_DATA_SIZE} {size} goes past the end "
                            f"of the binary data ({len(binary)} bytes after the JSON header, "
                            f"{len(binary) - offset} left for this input)")
            view = binary[offset:offset + size]
            offset += size
        elif "data" not in entry and placed is None:
            raise _fail(f"input {name!r} has neither data nor {BINARY_DATA_SIZE} (nor "
                        "shared memory parameters)")
        decode = in_region if placed is not None else _decoder(entry, shape, view)
        inputs.append(RequestInput(name, entry["datatype"], shape, decode, placed))
    if offset != len(binary):
        raise _fail(f"the body has {len(binary)} bytes of binary data after the JSON header "
                    f"but the inputs' {BINARY_DATA_SIZE} add up to {offset}")
    default_binary = bool(_flag(parameters, BINARY_DATA_OUTPUT, "request"))
    outputs, binary_outputs = _requested_outputs(header.get("outputs"), default_binary)
    request = InferRequest(model_name, model_version, inputs, outputs, sent_id,
                           parameters.get(TIMEOUT_PARAMETER), None, protocol="http")

    def wants_binary(output: str) -> bool:
        return binary_outputs.get(output, default_binary)

    return HttpInferRequest(request, sent_id, wants_binary)


def _requested_outputs(entries: object, default_binary: bool
                       ) -> tuple[list[RequestedOutput], Mapping[str, bool]]:
    if entries is None:
        return [], {}
    if not isinstance(entries, list):
        raise _fail(f"outputs must be a JSON array, got {_json_type(entries)}")
    outputs: list[RequestedOutput] = []
    binary: dict[str, bool] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _fail(f"outputs[{index}] must be a JSON object, got {_json_type(entry)}")
        name = _text(entry.get("name"), f"outputs[{index}].name")
        parameters = _object(entry.get("parameters"), f"output {name!r}: parameters")
        wanted = _flag(parameters, BINARY_DATA, f"output {name!r}:")
        binary[name] = default_binary if wanted is None else wanted
        outputs.append(RequestedOutput(name, parameters.get(CLASSIFICATION_PARAMETER),
                                       shared_memory_parameters(parameters)))
    return outputs, binary


def _json_data(name: str, array: np.ndarray, datatype: Datatype) -> list:
    flat = array.ravel(order="C")
    if datatype.name != "BYTES":
        return flat.tolist()
    values = []
    for item in flat:
        if isinstance(item, str):
            values.append(item)
            continue
        try:
            values.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot "
                f"carry; ask for it with \"parameters\": {{\"{BINARY_DATA}\": true}}"
            ) from None
    return values


def infer_response(result: InferResult, response_id: str,
                   binary: Callable[[str], bool]) -> tuple[bytes, list[bytes]]:
    """The JSON header of ``result``'s response and the binary outputs that follow it
    (none: the header is the whole body). An output written into shared memory has
    neither data nor parameters (Triton's HTTP answer).

    Raises:
        InvalidInputError: a BYTES output asked for as JSON holds bytes that are not UTF-8.
    """
    outputs = []
    chunks: list[bytes] = []
    placed = result.shared_memory
    for name, array in result.outputs:
        datatype = by_numpy(array.dtype)
        entry: dict[str, object] = {"name": name, "datatype": datatype.name,
                                    "shape": list(array.shape)}
        outputs.append(entry)
        if placed is not None and name in placed:
            continue  # in its region: the answer gives the name, datatype and shape only
        if binary(name):
            raw = encode_raw(array, datatype)
            entry["parameters"] = {BINARY_DATA_SIZE: len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(name, array, datatype)
    header = _JSON.encode({"model_name": result.model_name,
                           "model_version": result.model_version, "id": response_id,
                           "outputs": outputs}).encode()
    return header, chunks
