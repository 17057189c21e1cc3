"""Tensor serialisation: every datatype, raw and typed, and malformed data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import (
    TensorCodecError,
    decode_bytes_elements,
    decode_contents,
    decode_raw,
    encode_bytes_elements,
    encode_contents,
    encode_raw,
)
from onnxserve.protos.datatypes import DATATYPES, by_name, by_numpy

FIXED = [name for name in DATATYPES if name != "BYTES"]


def sample(name: str, shape=(2, 3)) -> np.ndarray:
    dtype = DATATYPES[name].numpy
    if name == "BOOL":
        return np.arange(np.prod(shape)).reshape(shape) % 2 == 0
    if dtype.kind == "f":
        return (np.arange(np.prod(shape)).reshape(shape) * 0.5 - 1).astype(dtype)
    info = np.iinfo(dtype)
    values = [info.min, info.max, 0, 1, 2, info.max - 1]  # the range's ends survive the trip
    return np.array(values, dtype=dtype).reshape(shape)


@pytest.mark.parametrize("name", FIXED)
def test_raw_round_trip_every_fixed_type(name: str) -> None:
    array = sample(name)
    datatype = by_name(name)
    raw = encode_raw(array, datatype)
    assert len(raw) == array.size * datatype.itemsize
    decoded = decode_raw(raw, datatype, array.shape)
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == (np.bool_ if name == "BOOL" else datatype.numpy)


@pytest.mark.parametrize("name", [n for n in FIXED if DATATYPES[n].contents_field])
def test_contents_round_trip_every_typed_field(name: str) -> None:
    array = sample(name)
    datatype = by_name(name)
    contents = encode_contents(array, datatype)
    assert contents.ListFields()[0][0].name == datatype.contents_field
    np.testing.assert_array_equal(decode_contents(contents, datatype, array.shape), array)


def test_raw_decode_is_zero_copy_and_little_endian() -> None:
    raw = np.array([1.5, -2.0], dtype="<f4").tobytes()
    decoded = decode_raw(raw, by_name("FP32"), (2,))
    assert not decoded.flags.owndata and not decoded.flags.writeable
    assert decoded.tolist() == [1.5, -2.0]
    big_endian = np.array([1, 258], dtype=">u2")
    assert encode_raw(big_endian, by_name("UINT16")) == b"\x01\x00\x02\x01"


def test_bytes_layout_is_length_prefixed_little_endian() -> None:
    array = np.array([b"ab", b"", "é"], dtype=object)
    raw = encode_bytes_elements(array)
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"
    decoded = decode_raw(raw, by_name("BYTES"), (3,))
    assert decoded.tolist() == [b"ab", b"", "é".encode()]


def test_bytes_contents_round_trip() -> None:
    array = np.array([[b"x", b"\x00\xff"], [b"", b"long" * 10]], dtype=object)
    contents = encode_contents(array, by_name("BYTES"))
    assert decode_contents(contents, by_name("BYTES"), (2, 2)).tolist() == array.tolist()


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x05\x00\x00\x00abc", 1, "declares 5 bytes"),
        (b"\x01\x00\x00\x00a\x00", 1, "left over"),
        (b"\x01\x00\x00\x00a", 2, "too short"),
        (b"\x00\x00\x00\x00\x00\x00", 1, "left over"),
        (b"\x03\x00\x00\x00abc\x00\x00", 2, "length prefix is missing"),
    ],
)
def test_malformed_bytes_are_rejected(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(TensorCodecError, match=message):
        decode_bytes_elements(raw, count)


def test_raw_size_mismatch_names_sizes() -> None:
    message = r"raw data is 8 bytes but shape \[3\] of FP32 needs 12"
    with pytest.raises(TensorCodecError, match=message):
        decode_raw(b"\x00" * 8, by_name("FP32"), (3,))


def test_huge_bytes_shape_fails_before_allocating() -> None:
    with pytest.raises(TensorCodecError, match="too short"):
        decode_raw(b"\x00" * 8, by_name("BYTES"), (10**6, 10**6))


def test_negative_dimension_is_rejected() -> None:
    with pytest.raises(TensorCodecError, match="negative"):
        decode_raw(b"", by_name("FP32"), (-1, 0))


def test_contents_errors() -> None:
    contents = pb.InferTensorContents(fp32_contents=[1.0, 2.0])
    with pytest.raises(TensorCodecError, match="contents has 2 elements but shape \\[3\\] needs 3"):
        decode_contents(contents, by_name("FP32"), (3,))
    with pytest.raises(TensorCodecError, match="belongs in int_contents"):
        decode_contents(contents, by_name("INT32"), (2,))
    with pytest.raises(TensorCodecError, match="outside the INT8 range"):
        decode_contents(pb.InferTensorContents(int_contents=[300]), by_name("INT8"), (1,))
    with pytest.raises(TensorCodecError, match="no typed contents field"):
        decode_contents(pb.InferTensorContents(), by_name("FP16"), (1,))


def test_by_numpy_maps_every_fixed_type_back() -> None:
    for name in FIXED:
        assert by_numpy(DATATYPES[name].numpy).name == name
    assert by_numpy(np.dtype("U3")).name == "BYTES"
    with pytest.raises(KeyError):
        by_numpy(np.dtype("complex64"))


@given(
    st.sampled_from(FIXED).flatmap(
        lambda name: st.tuples(
            st.just(name),
            hnp.arrays(
                np.bool_ if name == "BOOL" else DATATYPES[name].numpy.newbyteorder("="),
                hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
            ),
        )
    )
)
def test_property_raw_round_trip(case: tuple[str, np.ndarray]) -> None:
    name, array = case
    datatype = by_name(name)
    decoded = decode_raw(encode_raw(array, datatype), datatype, array.shape)
    np.testing.assert_array_equal(decoded, array)


@given(
    hnp.arrays(object, hnp.array_shapes(max_dims=3, max_side=4), elements=st.binary(max_size=20))
)
def test_property_bytes_round_trip(array: np.ndarray) -> None:
    datatype = by_name("BYTES")
    decoded = decode_raw(encode_raw(array, datatype), datatype, array.shape)
    assert decoded.shape == array.shape
    assert decoded.ravel().tolist() == array.ravel().tolist()
