"""The protocol's tensor datatypes and how they map to numpy, typed contents and config types;
``TensorSpec``, a tensor's name, datatype and shape as both the server and clients speak of
it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import model_config_pb2


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, protocol datatype (``FP32``, ...) and shape; -1 marks a dimension of
    any size (a model's leading -1 is its batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Datatype:
    """One protocol datatype (e.g. ``FP32``) and its representations."""

    name: str
    #: numpy dtype in wire byte order (little-endian); object for BYTES.
    numpy: np.dtype
    #: InferTensorContents field for typed data, or None for raw-only types (FP16).
    contents_field: str | None
    #: The model_config DataType enum value (TYPE_FP32, ...).
    config_type: int
    #: Bytes per element on the wire; 0 for BYTES (variable).
    itemsize: int


def _dt(name: str, numpy: str, field: str | None, config: str) -> Datatype:
    dtype = np.dtype(numpy)
    return Datatype(name, dtype, field, model_config_pb2.DataType.Value(config),
                    0 if name == "BYTES" else dtype.itemsize)


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", "|b1", "bool_contents", "TYPE_BOOL"),
        _dt("UINT8", "|u1", "uint_contents", "TYPE_UINT8"),
        _dt("UINT16", "<u2", "uint_contents", "TYPE_UINT16"),
        _dt("UINT32", "<u4", "uint_contents", "TYPE_UINT32"),
        _dt("UINT64", "<u8", "uint64_contents", "TYPE_UINT64"),
        _dt("INT8", "|i1", "int_contents", "TYPE_INT8"),
        _dt("INT16", "<i2", "int_contents", "TYPE_INT16"),
        _dt("INT32", "<i4", "int_contents", "TYPE_INT32"),
        _dt("INT64", "<i8", "int64_contents", "TYPE_INT64"),
        _dt("FP16", "<f2", None, "TYPE_FP16"),
        _dt("FP32", "<f4", "fp32_contents", "TYPE_FP32"),
        _dt("FP64", "<f8", "fp64_contents", "TYPE_FP64"),
        _dt("BYTES", "O", "bytes_contents", "TYPE_STRING"),
    )
}

_BY_CONFIG_TYPE = {d.config_type: d for d in DATATYPES.values()}
#: the native-order dtypes of the fixed-size datatypes
_BY_DTYPE = {d.numpy.newbyteorder("="): d for d in DATATYPES.values() if d.name != "BYTES"}
_BY_NUMPY_KIND = {
    (d.numpy.kind, d.numpy.itemsize): d for d in DATATYPES.values() if d.name != "BYTES"
}


def by_name(name: str) -> Datatype:
    """Look up a protocol datatype by name; KeyError names the supported ones."""
    try:
        return DATATYPES[name]
    except KeyError:
        raise KeyError(
            f"unsupported datatype {name!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def by_config_type(config_type: int) -> Datatype:
    """Look up the datatype for a model_config DataType enum value."""
    try:
        return _BY_CONFIG_TYPE[config_type]
    except KeyError:
        name = model_config_pb2.DataType.Name(config_type) if config_type in (
            model_config_pb2.DataType.values()
        ) else str(config_type)
        raise KeyError(f"unsupported config data_type {name}") from None


def by_numpy(dtype: np.dtype) -> Datatype:
    """The protocol datatype for a numpy dtype (bytes/str/object arrays map to BYTES)."""
    found = _BY_DTYPE.get(dtype)  # the usual case: an output's native dtype
    if found is not None:
        return found
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return DATATYPES["BYTES"]
    try:
        return _BY_NUMPY_KIND[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise KeyError(f"numpy dtype {dtype} has no protocol datatype") from None
