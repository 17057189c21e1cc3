"""The system shared memory registry (serving/shared_memory.py) on its own: keys, bounds,
tensors read and written, and when mappings are closed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing import shared_memory as mpshm
from pathlib import Path

import numpy as np
import pytest

from onnxserve.protos.codec import encode_bytes_elements
from onnxserve.protos.datatypes import by_name
from onnxserve.serving.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    UnimplementedError,
)
from onnxserve.serving.shared_memory import (
    NAME_MAX,
    SHM_DIRECTORY,
    Region,
    SharedMemoryParameters,
    SharedMemoryRegistry,
    cuda_shared_memory_unsupported,
    output_parameters,
    posix_shm_name,
    shared_memory_parameters,
)

SIZE = 8192


@pytest.fixture
def key(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh POSIX shared memory object of SIZE bytes; its key ("/name")."""
    name = f"onnxserve_test_{os.getpid()}_{request.node.name[:40]}"
    block = mpshm.SharedMemory(name, create=True, size=SIZE)
    try:
        yield "/" + name
    finally:
        block.close()
        block.unlink()


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    registry = SharedMemoryRegistry()
    yield registry
    registry.close()


def _write(key: str, offset: int, data: bytes) -> None:
    block = mpshm.SharedMemory(key.lstrip("/"))
    try:
        block.buf[offset:offset + len(data)] = data
    finally:
        block.close()


def _read(key: str, offset: int, size: int) -> bytes:
    block = mpshm.SharedMemory(key.lstrip("/"))
    try:
        return bytes(block.buf[offset:offset + size])
    finally:
        block.close()


def _mappings(key: str) -> int:
    """How many mappings of the object this process has (its /dev/shm file in
    /proc/self/maps); the ``key`` fixture's own is one."""
    path = str(SHM_DIRECTORY / key.lstrip("/"))
    return sum(line.split(maxsplit=5)[-1] == path
               for line in Path("/proc/self/maps").read_text().splitlines())


def _params(region: object = "r", byte_size: object = 32, offset: object = None,
            **extra: object) -> SharedMemoryParameters:
    values = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    if offset is not None:
        values["shared_memory_offset"] = offset
    values.update(extra)
    return SharedMemoryParameters(values)


def test_register_status_unregister(registry: SharedMemoryRegistry, key: str) -> None:
    registry.register("a", key, 0, 64)
    registry.register("b", key, 4096, 100)
    assert [(s.name, s.key, s.offset, s.byte_size) for s in registry.status()] == [
        ("a", key, 0, 64), ("b", key, 4096, 100)]
    assert [s.name for s in registry.status("b")] == ["b"]
    with pytest.raises(AlreadyExistsError, match="'a' is already registered"):
        registry.register("a", key, 0, 8)
    with pytest.raises(NotFoundError, match=r"'c' is registered.*'a', 'b'"):
        registry.status("c")
    assert registry.unregister("c") == []  # as Triton: no error
    assert registry.unregister("a") == ["a"]
    assert [s.name for s in registry.status()] == ["b"]
    registry.register("a", key, 0, 8)  # the name is free again
    assert sorted(registry.unregister()) == ["a", "b"]
    assert registry.status() == [] and len(registry) == 0


@pytest.mark.parametrize("bad", ["", "/", "//", "a/b", "/../etc/passwd", "/dev/shm/x", ".",
                                 "/..", "x\0y", "/" + "n" * (NAME_MAX + 1)])
def test_keys_must_be_posix_shared_memory_names(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="not a POSIX shared memory name"):
        posix_shm_name(bad)


def test_key_resolution_follows_shm_open() -> None:
    assert posix_shm_name("/input0") == "input0"
    assert posix_shm_name("input0") == "input0"
    assert posix_shm_name("//input0") == "input0"
    assert posix_shm_name("/" + "n" * NAME_MAX) == "n" * NAME_MAX


def test_register_refusals(registry: SharedMemoryRegistry, key: str, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no POSIX shared memory object has key"):
        registry.register("r", f"/onnxserve_missing_{os.getpid()}", 0, 8)
    with pytest.raises(InvalidInputError, match=r"offset 8000 \+ byte_size 200 = 8200 is past "
                       r"the end of shared memory object .* \(8192 bytes\)"):
        registry.register("r", key, 8000, 200)
    for offset, size, problem in ((0, 0, "byte_size must be an integer >= 1"),
                                  (-1, 8, "offset must be an integer >= 0"),
                                  (True, 8, "offset must be an integer >= 0"),
                                  (0, "8", "byte_size must be an integer >= 1")):
        with pytest.raises(InvalidInputError, match=problem):
            registry.register("r", key, offset, size)
    with pytest.raises(InvalidInputError, match="needs a name"):
        registry.register("", key, 0, 8)
    with pytest.raises(InvalidInputError, match="key must be a string"):
        registry.register("r", 5, 0, 8)
    assert len(registry) == 0
    # Only regular files directly in the directory: no symbolic links, no directories.
    local = SharedMemoryRegistry(tmp_path)
    (tmp_path / "target").write_bytes(b"\0" * 64)
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InvalidInputError, match="symbolic link"):
        local.register("r", "/link", 0, 8)
    with pytest.raises(InvalidInputError, match="cannot open"):
        local.register("r", "/folder", 0, 8)
    local.register("r", "/target", 0, 64)
    assert local.close() == 1


def test_fixed_size_input_is_a_read_only_view_at_its_offset(
        registry: SharedMemoryRegistry, key: str) -> None:
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    _write(key, 4096 + 100 + 16, values.tobytes())
    registry.register("r", key, 4096 + 100, 1024)  # an offset that is not page-aligned
    held: list[Region] = []
    array = registry.read_input("x", by_name("FP32"), (2, 4), _params(offset=16), held)
    np.testing.assert_array_equal(array, values)
    assert not array.flags.writeable and not array.flags.owndata  # a view, not a copy
    _write(key, 4096 + 100 + 16, np.full(8, 7, np.float32).tobytes())
    assert (array == 7).all()  # the view sees the client's writes
    assert len(held) == 1 and held[0].users == 1
    registry.release(held)
    assert held[0].users == 0


def test_bool_bytes_and_misaligned_inputs(registry: SharedMemoryRegistry, key: str) -> None:
    text = np.array([b"hello", b"", b"x", b"yz"], dtype=object)
    encoded = encode_bytes_elements(text)
    _write(key, 0, bytes([1, 0, 2, 0]) + encoded)
    _write(key, 1001, np.arange(4, dtype=np.int32).tobytes())
    registry.register("r", key, 0, SIZE)
    held: list[Region] = []
    flags = registry.read_input("b", by_name("BOOL"), (2, 2), _params(byte_size=4), held)
    np.testing.assert_array_equal(flags, [[True, False], [True, False]])
    strings = registry.read_input("s", by_name("BYTES"), (2, 2),
                                  _params(byte_size=len(encoded), offset=4), held)
    assert strings.tolist() == [[b"hello", b""], [b"x", b"yz"]]
    odd = registry.read_input("i", by_name("INT32"), (4,), _params(byte_size=16, offset=1001),
                              held)
    assert odd.flags.aligned and odd.tolist() == [0, 1, 2, 3]
    with pytest.raises(InvalidInputError, match=r"input 's' \(shared memory region 'r'\): "
                       "BYTES data has 1 bytes left over"):
        registry.read_input("s", by_name("BYTES"), (2, 2),
                            _params(byte_size=len(encoded) + 1, offset=4), held)
    registry.release(held)


@pytest.mark.parametrize(("params", "problem"), [
    (_params(byte_size=16), "shared_memory_byte_size is 16 but shape \\[2, 4\\] of FP32 needs "
     "32 bytes"),
    (_params(offset=1000), "shared_memory_offset 1000 \\+ shared_memory_byte_size 32 = 1032 "
     "runs past the end of shared memory region 'r' \\(1024 bytes\\)"),
    (_params(offset=-4), "'shared_memory_offset' must be an integer >= 0, got -4"),
    (_params(byte_size=2.5), "'shared_memory_byte_size' must be an integer >= 0, got 2.5"),
    (_params(region=7), "'shared_memory_region' must be a region's name"),
    (_params(region=""), "'shared_memory_region' must be a region's name"),
    (SharedMemoryParameters({"shared_memory_region": "r"}), "'shared_memory_byte_size' must "
     "be given with 'shared_memory_region'"),
    (SharedMemoryParameters({"shared_memory_offset": 0}), "'shared_memory_offset' can only "
     "be given with 'shared_memory_region'"),
    (SharedMemoryParameters(_params().values, with_data=True), "has data in the request and "
     "shared memory parameters"),
])
def test_input_refusals(registry: SharedMemoryRegistry, key: str,
                        params: SharedMemoryParameters, problem: str) -> None:
    registry.register("r", key, 0, 1024)
    held: list[Region] = []
    with pytest.raises(InvalidInputError, match=f"input 'x'.*{problem}"):
        registry.read_input("x", by_name("FP32"), (2, 4), params, held)
    registry.release(held)
    assert all(region.users == 0 for region in held)


def test_unknown_region(registry: SharedMemoryRegistry) -> None:
    held: list[Region] = []
    with pytest.raises(NotFoundError, match="no system shared memory region 'r'"):
        registry.read_input("x", by_name("FP32"), (2, 4), _params(), held)
    with pytest.raises(NotFoundError, match="no system shared memory region 'r'"):
        registry.output_target("y", _params(), held)
    assert held == []


def test_outputs_are_written_and_must_fit(registry: SharedMemoryRegistry, key: str) -> None:
    registry.register("r", key, 100, 64)
    held: list[Region] = []
    region, placement = registry.output_target("y", _params(byte_size=48, offset=8), held)
    values = np.arange(8, dtype=np.float32).reshape(2, 4)[:, ::-1]  # not contiguous
    written = registry.write_output("y", values, region, placement)
    assert output_parameters(written) == {"shared_memory_region": "r",
                                          "shared_memory_offset": 8,
                                          "shared_memory_byte_size": 32}
    assert _read(key, 108, 32) == np.ascontiguousarray(values).tobytes()
    text = np.array([b"ab", b"c"], dtype=object)
    written = registry.write_output("s", text, region, placement)
    assert _read(key, 108, written.byte_size) == encode_bytes_elements(text)
    with pytest.raises(InvalidInputError, match=r"output 'y' needs 64 bytes \(FP64 \[2, 4\]\) "
                       "but its shared memory placement in region 'r' has "
                       "shared_memory_byte_size 48"):
        registry.write_output("y", values.astype(np.float64), region, placement)
    with pytest.raises(InvalidInputError, match=r"output 'y'.*runs past the end"):
        registry.output_target("y", _params(byte_size=64, offset=8), held)
    registry.release(held)


def test_a_held_region_is_unmapped_when_the_last_request_lets_go(
        registry: SharedMemoryRegistry, key: str) -> None:
    assert _mappings(key) == 1
    registry.register("r", key, 0, 64)
    assert _mappings(key) == 2
    held: list[Region] = []
    array = registry.read_input("x", by_name("FP32"), (2, 4), _params(), held)
    assert registry.unregister("r") == ["r"]
    with pytest.raises(NotFoundError):  # the name is gone at once
        registry.status("r")
    assert _mappings(key) == 2 and array.sum() == 0  # ... the mapping stays while in use
    registry.release(held)
    assert _mappings(key) == 2  # the view still exists: the mapping goes with it
    del array
    assert _mappings(key) == 1


def test_unregister_unmaps_at_once_when_unused(registry: SharedMemoryRegistry,
                                               key: str) -> None:
    registry.register("r", key, 0, 64)
    registry.register("s", key, 64, 64)
    held: list[Region] = []
    registry.read_input("x", by_name("FP32"), (2, 4), _params(), held)  # view dropped
    registry.release(held)
    assert _mappings(key) == 3
    assert registry.close() == 2
    assert _mappings(key) == 1


def test_front_end_hooks() -> None:
    assert shared_memory_parameters({}) is None
    assert shared_memory_parameters({"classification": 3, "binary_data": True}) is None
    placed = shared_memory_parameters({"shared_memory_region": "r", "classification": 3,
                                       "shared_memory_byte_size": 4}, with_data=True)
    assert placed == SharedMemoryParameters(
        {"shared_memory_region": "r", "shared_memory_byte_size": 4}, True)
    with pytest.raises(UnimplementedError, match="CUDA shared memory is not supported"):
        cuda_shared_memory_unsupported()
