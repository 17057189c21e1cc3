"""Where an ONNX file's external data lives, checked before onnxruntime opens the file.

An ONNX tensor may keep its bytes in another file (``external_data`` entry ``location``,
relative to the model file). onnxruntime releases before 1.24 follow any location, absolute
or ``../``, so a model in the repository could make the server read, and answer with, any
file it can open. Every location of every tensor (initializers, sparse initializers,
constants in node attributes, subgraphs, functions, training graphs) must resolve, symlinks
followed, inside the model's own folders.

The file is read through ``mmap`` by a small walker of protobuf's wire format that only
descends into the messages that can hold tensors and skips everything else (tensor bytes
included) by length, so a 500 MB model is checked without being copied into memory.
Field numbers are onnx.proto's.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from onnxserve.serving.errors import ModelLoadError

# The messages that can hold tensors: message -> {field number: message it holds}.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _TRAINING, _SPARSE, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    # ModelProto: graph, training_info, functions
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    # GraphProto: node, initializer, sparse_initializer
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    # NodeProto: attribute
    _NODE: {5: _ATTRIBUTE},
    # AttributeProto: t, g, tensors, graphs, sparse_tensor, sparse_tensors
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    # FunctionProto: node
    _FUNCTION: {7: _NODE},
    # TrainingInfoProto: initialization, algorithm
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    # SparseTensorProto: values, indices
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
#: TensorProto.external_data (StringStringEntryProto), .data_location and its EXTERNAL value
_EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 13, 14, 1
#: StringStringEntryProto.key / .value
_KEY, _VALUE = 1, 2
#: protobuf messages nest at most this deep when parsed by onnxruntime's protobuf
_MAX_DEPTH = 100


class _Malformed(ValueError):
    pass


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(data: memoryview, pos: int, end: int, wire: int, field: int) -> int:
    """The position after a field of wire type ``wire`` whose value starts at ``pos``."""
    if wire == 0:
        return _varint(data, pos, end)[1]
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    elif wire == 2:
        length, pos = _varint(data, pos, end)
        pos += length
    elif wire == 3:  # a group: skip fields up to its end tag
        while True:
            key, pos = _varint(data, pos, end)
            if key & 7 == 4:
                if key >> 3 != field:
                    raise _Malformed("mismatched group end")
                return pos
            pos = _skip(data, pos, end, key & 7, key >> 3)
    else:
        raise _Malformed(f"wire type {wire}")
    if pos > end:
        raise _Malformed("field runs past its message")
    return pos


def _tensor_locations(data: memoryview, start: int, end: int) -> tuple[bool, list[str]]:
    """(data_location is EXTERNAL, the external_data ``location`` values) of one tensor."""
    external, locations = False, []
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        field, wire = key >> 3, key & 7
        if field == _DATA_LOCATION and wire == 0:
            value, pos = _varint(data, pos, end)
            external = value == _EXTERNAL
        elif field == _EXTERNAL_DATA and wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise _Malformed("field runs past its message")
            entry = _entry(data, pos, pos + length)
            if entry[0] == "location":
                locations.append(entry[1])
            pos += length
        else:
            pos = _skip(data, pos, end, wire, field)
    return external, locations


def _entry(data: memoryview, start: int, end: int) -> tuple[str, str]:
    found = {_KEY: "", _VALUE: ""}
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        field, wire = key >> 3, key & 7
        if field in found and wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise _Malformed("field runs past its message")
            found[field] = bytes(data[pos:pos + length]).decode("utf-8", "replace")
            pos += length
        else:
            pos = _skip(data, pos, end, wire, field)
    return found[_KEY], found[_VALUE]


def _walk(data: memoryview) -> Iterator[tuple[bool, list[str]]]:
    """Every tensor's (external flag, locations), depth first, without recursion."""
    stack = [(_MODEL, 0, len(data), 0)]
    while stack:
        kind, pos, end, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise _Malformed("messages nested too deep")
        if kind == _TENSOR:
            yield _tensor_locations(data, pos, end)
            continue
        children = _CHILDREN[kind]
        while pos < end:
            key, pos = _varint(data, pos, end)
            field, wire = key >> 3, key & 7
            child = children.get(field)
            if child is not None and wire == 2:
                length, pos = _varint(data, pos, end)
                if pos + length > end:
                    raise _Malformed("field runs past its message")
                stack.append((child, pos, pos + length, depth + 1))
                pos += length
            else:
                pos = _skip(data, pos, end, wire, field)


def external_locations(model_file: Path) -> list[str]:
    """Every external-data ``location`` the ONNX file names, in file order, with duplicates.

    Raises:
        ModelLoadError: the file cannot be read or is not a valid protobuf message, or a
            tensor says its data is external without naming a location.
    """
    try:
        with model_file.open("rb") as f:
            if model_file.stat().st_size == 0:
                raise ModelLoadError(f"cannot load {model_file.name}: the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                data = memoryview(mapped)
                try:
                    found = []
                    for external, locations in _walk(data):
                        if external and not locations:
                            raise ModelLoadError(
                                f"cannot load {model_file.name}: a tensor's data is external "
                                "but names no location")
                        found.extend(locations)
                    return found
                finally:
                    data.release()
    except _Malformed as exc:
        raise ModelLoadError(
            f"cannot load {model_file.name}: not a valid ONNX file ({exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot load {model_file.name}: {exc.strerror}") from None


def check_external_data(model_file: Path, model_folder: Path) -> None:
    """Refuse a model whose external data lies outside its folders.

    A location must be relative, and resolve (symlinks followed) inside the folder holding
    ``model_file`` or inside ``model_folder`` (the model's folder in the repository; a
    version folder may be a link to elsewhere, as Triton allows).

    Raises:
        ModelLoadError: naming the location and the rule, not whether the target exists.
    """
    locations = external_locations(model_file)
    if not locations:
        return
    roots = {model_file.parent.resolve(), model_folder.resolve()}
    for location in dict.fromkeys(locations):
        inside = False
        if location and "\0" not in location and not Path(location).is_absolute():
            target = (model_file.parent / location).resolve()
            inside = any(root in target.parents for root in roots)
        if not inside:
            raise ModelLoadError(
                f"{model_file.name}: external data location {location[:200]!r} points outside "
                "the model folder; tensors' data files must lie beside the model file")
