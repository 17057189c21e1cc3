"""Tensor (de)serialisation for the KServe V2 wire format, shared by server and clients.

Raw tensors are row-major little-endian bytes, exactly ``prod(shape) * itemsize`` long.
BYTES tensors are a sequence of elements, each a 4-byte little-endian unsigned length
followed by that many bytes, with no padding. Decoding raw data returns a read-only
``np.frombuffer`` view of the message's bytes: no copy.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from . import inference_pb2
from .datatypes import Datatype, by_name

_LENGTH = struct.Struct("<I")


class TensorCodecError(ValueError):
    """A tensor's data does not match its declared datatype and shape."""


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a fixed shape; rejects negative dimensions."""
    if shape and min(shape) < 0:
        raise TensorCodecError(f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def encode_bytes_elements(array: np.ndarray) -> bytes:
    """Serialise a BYTES tensor (any array of bytes/str) as length-prefixed elements."""
    parts: list[bytes] = []
    for item in np.asarray(array, dtype=object).ravel(order="C"):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes_elements(raw: bytes, count: int) -> np.ndarray:
    """Parse ``count`` length-prefixed elements; the buffer must hold exactly those."""
    if count * _LENGTH.size > len(raw):
        raise TensorCodecError(
            f"BYTES data is {len(raw)} bytes, too short for {count} elements "
            f"(each needs at least a {_LENGTH.size}-byte length prefix)"
        )
    items = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise TensorCodecError(
                f"BYTES data ends after {i} of {count} elements (a 4-byte length prefix is missing)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise TensorCodecError(
                f"BYTES element {i} declares {length} bytes but only {len(view) - offset} remain"
            )
        items[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise TensorCodecError(
            f"BYTES data has {len(view) - offset} bytes left over after {count} elements"
        )
    return items


def decode_raw(raw: bytes, datatype: Datatype, shape: Sequence[int]) -> np.ndarray:
    """Turn raw wire bytes into an array of ``shape`` (a zero-copy view for fixed-size types)."""
    count = element_count(shape)
    if datatype.name == "BYTES":
        return decode_bytes_elements(raw, count).reshape(shape)
    expected = count * datatype.itemsize
    if len(raw) != expected:
        raise TensorCodecError(
            f"raw data is {len(raw)} bytes but shape {list(shape)} of {datatype.name} "
            f"needs {expected} bytes"
        )
    if datatype.name == "BOOL":
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape) != 0
    return np.frombuffer(raw, dtype=datatype.numpy).reshape(shape)


def encode_raw(array: np.ndarray, datatype: Datatype) -> bytes:
    """Serialise an array as raw wire bytes for ``datatype``."""
    if datatype.name == "BYTES":
        return encode_bytes_elements(array)
    return np.ascontiguousarray(array, dtype=datatype.numpy).tobytes()


def decode_contents(
    contents: inference_pb2.InferTensorContents, datatype: Datatype, shape: Sequence[int]
) -> np.ndarray:
    """Turn typed ``contents`` into an array of ``shape``."""
    count = element_count(shape)
    if datatype.contents_field is None:
        raise TensorCodecError(
            f"{datatype.name} has no typed contents field; send it in raw_input_contents"
        )
    for field, _ in contents.ListFields():
        if field.name != datatype.contents_field:
            raise TensorCodecError(
                f"contents has {field.name} but {datatype.name} data belongs in "
                f"{datatype.contents_field}"
            )
    values = getattr(contents, datatype.contents_field)
    if len(values) != count:
        raise TensorCodecError(
            f"contents has {len(values)} elements but shape {list(shape)} needs {count}"
        )
    if datatype.name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    if datatype.numpy.kind in "iu":
        info = np.iinfo(datatype.numpy)
        if count and (min(values) < info.min or max(values) > info.max):
            raise TensorCodecError(
                f"contents has values outside the {datatype.name} range [{info.min}, {info.max}]"
            )
    return np.asarray(values, dtype=datatype.numpy).reshape(shape)


def encode_contents(array: np.ndarray, datatype: Datatype) -> inference_pb2.InferTensorContents:
    """Serialise an array as typed contents (for clients that cannot send raw data)."""
    if datatype.contents_field is None:
        raise TensorCodecError(f"{datatype.name} has no typed contents field; use raw data")
    contents = inference_pb2.InferTensorContents()
    flat = np.asarray(array).ravel(order="C")
    if datatype.name == "BYTES":
        values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in flat]
    else:
        values = flat.astype(datatype.numpy, copy=False).tolist()
    getattr(contents, datatype.contents_field).extend(values)
    return contents


def datatype_of(name: str) -> Datatype:
    """The Datatype for a wire name, as a TensorCodecError when it is not supported."""
    try:
        return by_name(name)
    except KeyError as exc:
        raise TensorCodecError(str(exc.args[0])) from None
