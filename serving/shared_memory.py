"""Triton's system shared memory extension: tensors read from and written into POSIX shared
memory that a client on the same host registered, instead of travelling in the messages.

A client creates a POSIX shared memory object (``shm_open`` with a key such as
``"/input0"``; tritonclient.utils.shared_memory does this through Python's
multiprocessing.shared_memory), registers a *region* of it under a name
(SystemSharedMemoryRegister: name, key, offset, byte_size), and then names the region in
a tensor's parameters (Triton's names):

    shared_memory_region     string, the registered region's name
    shared_memory_byte_size  int, the tensor's size in bytes (required with the region)
    shared_memory_offset     int, where the tensor starts inside the region (default 0)

An input so placed is read from the region: exactly ``prod(shape) * itemsize`` bytes for
fixed-size types, the length-prefixed elements of protos/codec.py for BYTES. A requested
output so placed is written into the region after the run; its gRPC answer carries these
parameters (``shared_memory_byte_size`` = the bytes written) and no data, its HTTP answer
neither (as Triton's: frontends/http_codec.py).

**Keys.** Only POSIX shared memory names are accepted, resolved as glibc's shm_open does
(leading slashes dropped, the rest one name under /dev/shm, opened O_RDWR | O_NOFOLLOW):
no other slash, not "." or "..", no NUL, at most NAME_MAX bytes. Registering maps
``[offset, offset + byte_size)`` of the object once; the object must be that large.

**Lifetime.** Each request holds (reference-counts) the regions it uses from the moment it
resolves them until it ends, so unregistering a region a request is using only removes its
name at once (new requests get NOT_FOUND); the mapping is closed when the last such request
ends. Inputs are zero-copy, read-only numpy views of the mapping, and Python's buffer
protocol keeps a mapping alive while any view of it exists (mmap refuses to close with
views outstanding; then the mapping is released with its last view), so no code can read
unmapped memory. Outputs are copied into the region (one memcpy per output). The regions
are per server process (with ``--workers N``, per worker: register and infer on one
connection) and are all unmapped when the server stops.

**Limits.** A client that shrinks (ftruncate) its object while a request reads or writes
it makes the server fault (SIGBUS), as with Triton: each request checks the object's size
when it takes the region, which narrows but cannot close that window, so only clients
trusted with the server's memory should share it. CUDA shared memory is not offered.

Errors follow Triton's codes: an unknown region in a tensor or in a status query is
NOT_FOUND, a name registered twice ALREADY_EXISTS, bad parameters, offsets or sizes
INVALID_ARGUMENT (Triton answers an output region that is too small with INTERNAL; here it
is the caller's INVALID_ARGUMENT). Unregistering a name that is not registered succeeds,
as with Triton.
"""

from __future__ import annotations

import errno
import gc
import logging
import mmap
import os
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from onnxserve.protos.codec import (
    TensorCodecError,
    decode_bytes_elements,
    element_count,
    encode_bytes_elements,
)
from onnxserve.protos.datatypes import Datatype, by_numpy
from onnxserve.serving.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    UnimplementedError,
)

log = logging.getLogger(__name__)

#: where Linux's shm_open creates and finds POSIX shared memory objects
SHM_DIRECTORY = Path("/dev/shm")
#: the longest name a POSIX shared memory object may have (Linux's NAME_MAX)
NAME_MAX = 255

REGION_PARAMETER = "shared_memory_region"
OFFSET_PARAMETER = "shared_memory_offset"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"
PARAMETERS = (REGION_PARAMETER, OFFSET_PARAMETER, BYTE_SIZE_PARAMETER)

CUDA_UNSUPPORTED = ("CUDA shared memory is not supported by this server; place tensors in "
                    "system shared memory (SystemSharedMemoryRegister) or send them in the "
                    "request")


@dataclass(frozen=True, slots=True)
class SharedMemoryParameters:
    """A tensor's shared memory parameters as the request sent them (any type; checked
    when the data plane uses them). ``values`` holds only the keys present, of
    ``PARAMETERS``; ``with_data`` says that the tensor also carries data in the request
    (an error for an input)."""

    values: Mapping[str, object]
    with_data: bool = False


def shared_memory_parameters(parameters: Mapping[str, object],
                             with_data: bool = False) -> SharedMemoryParameters | None:
    """What a front end puts in RequestInput/RequestedOutput.shared_memory for a tensor
    whose parameters (name -> plain value: str, int, float, bool) are ``parameters``:
    None when it has none of Triton's shared memory parameters."""
    present = {key: parameters[key] for key in PARAMETERS if key in parameters}
    return SharedMemoryParameters(present, with_data) if present else None


def output_parameters(output: SharedMemoryOutput) -> dict[str, object]:
    """The parameters an answer's output placed in shared memory carries (instead of
    data): the region, the offset and the bytes written."""
    return {REGION_PARAMETER: output.region, OFFSET_PARAMETER: output.offset,
            BYTE_SIZE_PARAMETER: output.byte_size}


def in_region() -> NoReturn:
    """The ``decode`` of a RequestInput placed in shared memory, for front ends: never
    called, since the data plane reads such an input from its region.

    Raises:
        TensorCodecError: always.
    """
    raise TensorCodecError("is in shared memory: the data plane reads it from its region")


def cuda_shared_memory_unsupported() -> NoReturn:
    """Answer to every CUDA shared memory operation.

    Raises:
        UnimplementedError: always.
    """
    raise UnimplementedError(CUDA_UNSUPPORTED)


@dataclass(frozen=True, slots=True)
class RegionStatus:
    """A registered region as SystemSharedMemoryStatus reports it: the key as the client
    gave it, the offset into the object and the size, in bytes."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class Placement:
    """A tensor's checked shared memory parameters: ``byte_size`` bytes at ``offset``
    into the registered region ``region``."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class SharedMemoryOutput:
    """An output written into shared memory: ``byte_size`` bytes at ``offset`` into
    ``region`` (the answer reports these instead of data)."""

    region: str
    offset: int
    byte_size: int


class Region:
    """One registered region: the mapping of ``byte_size`` bytes at ``offset`` into the
    object ``key``, and how many requests hold it."""

    __slots__ = ("_map", "_start", "byte_size", "key", "name", "offset", "retired", "users")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapping: mmap.mmap,
                 start: int) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self._map = mapping
        #: where the region begins in the mapping (the mapping starts page-aligned)
        self._start = start
        #: requests holding the region
        self.users = 0
        #: unregistered: close the mapping when the last user lets go
        self.retired = False

    def span(self, placement: Placement, what: str) -> int:
        """The mapping position of ``placement``'s first byte, after checking that it lies
        inside the region and that the object is still large enough.

        Raises:
            InvalidInputError: the placement runs past the region, or the object shrank.
        """
        end = placement.offset + placement.byte_size
        if end > self.byte_size:
            raise InvalidInputError(
                f"{what}: {OFFSET_PARAMETER} {placement.offset} + {BYTE_SIZE_PARAMETER} "
                f"{placement.byte_size} = {end} runs past the end of shared memory region "
                f"{self.name!r} ({self.byte_size} bytes)")
        if self._map.size() < self.offset + self.byte_size:
            raise InvalidInputError(
                f"{what}: shared memory object {self.key!r} of region {self.name!r} shrank "
                f"to {self._map.size()} bytes since it was registered; register it again")
        return self._start + placement.offset

    def read(self, position: int, dtype: np.dtype, count: int) -> np.ndarray:
        """A zero-copy view of ``count`` elements of ``dtype`` at mapping ``position``."""
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=position)

    def read_bytes(self, position: int, byte_size: int, count: int) -> np.ndarray:
        """``count`` BYTES elements (length-prefixed) filling ``byte_size`` bytes."""
        with memoryview(self._map) as whole, whole[position:position + byte_size] as view:
            return decode_bytes_elements(view, count)  # type: ignore[arg-type]

    def write(self, position: int, data: memoryview | bytes) -> None:
        self._map[position:position + len(data)] = data

    def close(self) -> bool:
        """Unmap now (True), or leave the unmapping to the release of the last view of
        the mapping, which then holds the last reference to it (False). The region is
        unusable after either.

        Views of a finished request can outlive it in a reference cycle (a failed request's
        exception holds the frames that hold its inputs): those are collected first, so
        that the unmapping does not wait for Python's cyclic collector to run by chance
        (in an idle server, never)."""
        mapping = self._map
        del self._map
        for attempt in (1, 2):
            try:
                mapping.close()
            except BufferError:  # views of it still exist
                if attempt == 2:
                    return False
                gc.collect()
            else:
                return True
        return False


class SharedMemoryRegistry:
    """The registered system shared memory regions of this server process.

    Thread-safe (one lock); every method runs in microseconds apart from register's
    open/fstat/mmap system calls.
    """

    def __init__(self, directory: Path = SHM_DIRECTORY) -> None:
        self._directory = directory
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    # --- the extension's operations --------------------------------------------------------

    def register(self, name: object, key: object, offset: object, byte_size: object) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the POSIX shared memory object ``key``
        as region ``name``.

        Raises:
            InvalidInputError: a bad name, key, offset or size, an object smaller than
                ``offset + byte_size``, or one the server cannot open or map.
            AlreadyExistsError: ``name`` is registered.
            NotFoundError: no shared memory object has that key.
        """
        if not isinstance(name, str) or not name:
            raise InvalidInputError(
                f"a shared memory region needs a name (a non-empty string), got {name!r}")
        if not isinstance(key, str):
            raise InvalidInputError(
                f"shared memory region {name!r}: key must be a string, got {key!r}")
        offset = _integer(offset, f"shared memory region {name!r}: offset", 0)
        byte_size = _integer(byte_size, f"shared memory region {name!r}: byte_size", 1)
        path = self._directory / posix_shm_name(key)
        with self._lock:
            if name in self._regions:
                raise AlreadyExistsError(
                    f"shared memory region {name!r} is already registered (key "
                    f"{self._regions[name].key!r}); unregister it first or choose another "
                    "name")
            self._regions[name] = _map_region(name, key, path, offset, byte_size)
        log.info("registered shared memory region %r: key %r, offset %d, %d bytes", name, key,
                 offset, byte_size)

    def unregister(self, name: str = "") -> list[str]:
        """Unregister region ``name``, or every region when ``name`` is "" (an unknown name
        is no error, as with Triton); returns the names unregistered. A region a request
        holds is unmapped when the last such request ends."""
        with self._lock:
            if name:
                region = self._regions.pop(name, None)
                regions = [] if region is None else [region]
            else:
                regions = list(self._regions.values())
                self._regions.clear()
            for region in regions:
                region.retired = True
                if region.users == 0:
                    region.close()
        if regions:
            log.info("unregistered shared memory region(s) %s",
                     ", ".join(repr(r.name) for r in regions))
        return [r.name for r in regions]

    def status(self, name: str = "") -> list[RegionStatus]:
        """Region ``name``, or every region when ``name`` is "".

        Raises:
            NotFoundError: no region is registered as ``name``.
        """
        with self._lock:
            if not name:
                regions = list(self._regions.values())
            elif name in self._regions:
                regions = [self._regions[name]]
            else:
                raise NotFoundError(self._unknown(name))
        return [RegionStatus(r.name, r.key, r.offset, r.byte_size) for r in regions]

    def close(self) -> int:
        """Unregister (and unmap, once no request holds them) every region, at server
        exit; returns how many there were."""
        return len(self.unregister(""))

    def __len__(self) -> int:
        return len(self._regions)

    # --- requests ---------------------------------------------------------------------------

    def read_input(self, name: str, datatype: Datatype, shape: Sequence[int],
                   parameters: SharedMemoryParameters, held: list[Region]) -> np.ndarray:
        """Input ``name`` (already checked against the model: ``datatype`` and ``shape``)
        from the region its parameters name: a read-only zero-copy view for fixed-size
        types (a copy when the offset leaves it misaligned, and for BOOL), parsed
        elements for BYTES. The region is appended to ``held`` (release it with
        ``release``).

        Raises:
            InvalidInputError: bad parameters, data in the request too, a placement past
                the region, or a byte size that does not match the shape and datatype.
            NotFoundError: the region is not registered.
        """
        what = f"input {name!r}"
        if parameters.with_data:
            raise InvalidInputError(
                f"{what} has data in the request and shared memory parameters; send one or "
                "the other")
        placement = parse_placement(what, parameters)
        region = self._hold(placement.region, held)
        position = region.span(placement, what)
        count = element_count(shape)
        if datatype.name == "BYTES":
            try:
                array = region.read_bytes(position, placement.byte_size, count)
            except TensorCodecError as exc:
                raise InvalidInputError(
                    f"{what} (shared memory region {region.name!r}): {exc}") from None
            return array.reshape(shape)
        expected = count * datatype.itemsize
        if placement.byte_size != expected:
            raise InvalidInputError(
                f"{what}: {BYTE_SIZE_PARAMETER} is {placement.byte_size} but shape "
                f"{list(shape)} of {datatype.name} needs {expected} bytes")
        if datatype.name == "BOOL":
            return region.read(position, np.dtype(np.uint8), count).reshape(shape) != 0
        array = region.read(position, datatype.numpy, count).reshape(shape)
        if not array.flags.aligned:
            return array.copy()
        array.flags.writeable = False
        return array

    def output_target(self, name: str, parameters: SharedMemoryParameters,
                      held: list[Region]) -> tuple[Region, Placement]:
        """Where requested output ``name`` goes (checked before the run, so a request
        with a bad output region is refused before it runs); appends the region to
        ``held``.

        Raises:
            InvalidInputError: bad parameters or a placement past the region.
            NotFoundError: the region is not registered.
        """
        what = f"output {name!r}"
        placement = parse_placement(what, parameters)
        region = self._hold(placement.region, held)
        region.span(placement, what)
        return region, placement

    @staticmethod
    def write_output(name: str, array: np.ndarray, region: Region,
                     placement: Placement) -> SharedMemoryOutput:
        """Copy output ``name`` into its place: raw little-endian bytes, or length-prefixed
        elements for BYTES (the layout of raw_output_contents).

        Raises:
            InvalidInputError: the output needs more than the placement's byte size.
        """
        datatype = by_numpy(array.dtype)
        data: memoryview | bytes
        if datatype.name == "BYTES":
            data = encode_bytes_elements(array)
        else:
            data = np.ascontiguousarray(array, dtype=datatype.numpy).data.cast("B")
        if len(data) > placement.byte_size:
            raise InvalidInputError(
                f"output {name!r} needs {len(data)} bytes ({datatype.name} "
                f"{list(array.shape)}) but its shared memory placement in region "
                f"{region.name!r} has {BYTE_SIZE_PARAMETER} {placement.byte_size}")
        position = region.span(placement, f"output {name!r}")
        region.write(position, data)
        return SharedMemoryOutput(placement.region, placement.offset, len(data))

    def release(self, held: Iterable[Region]) -> bool:
        """Let go of regions a request held; unmap those unregistered meanwhile once no
        request holds them. Returns whether such a region is still mapped because views
        of it live on (the caller's own frames, while its failure propagates): once they
        are gone, ``collect`` unmaps it."""
        pending = False
        with self._lock:
            for region in held:
                region.users -= 1
                if region.retired and region.users == 0:
                    pending = not region.close() or pending
        return pending

    @staticmethod
    def collect() -> None:
        """Free the views of finished requests that only reference cycles still hold, so
        that the regions they map are unmapped (see Region.close)."""
        gc.collect()

    def _hold(self, name: str, held: list[Region]) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise NotFoundError(self._unknown(name))
            region.users += 1
        held.append(region)
        return region

    def _unknown(self, name: str) -> str:
        known = ", ".join(repr(n) for n in self._regions) or "none"
        return (f"no system shared memory region {name!r} is registered (registered: "
                f"{known})")


def posix_shm_name(key: str) -> str:
    """The file name under /dev/shm that shm_open(``key``) opens.

    Raises:
        InvalidInputError: ``key`` is not a POSIX shared memory name.
    """
    name = key.lstrip("/")
    problem = None
    if not name:
        problem = "it is empty"
    elif "/" in name:
        problem = "it contains '/' after the leading one (a path, not a name)"
    elif name in (".", ".."):
        problem = f"{name!r} is not a name"
    elif "\0" in name:
        problem = "it contains a NUL character"
    elif len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        problem = f"it is longer than {NAME_MAX} bytes"
    if problem is not None:
        raise InvalidInputError(
            f"shared memory key {key[:300]!r} is not a POSIX shared memory name: {problem}; "
            "expected '/name' (as given to shm_open)")
    return name


def parse_placement(what: str, parameters: SharedMemoryParameters) -> Placement:
    """Check a tensor's shared memory parameters (Triton's rules: the region is a string,
    the byte size an integer given with it, the offset an optional integer, both >= 0).

    Raises:
        InvalidInputError: naming the parameter, what it must be and what came.
    """
    values = parameters.values
    if REGION_PARAMETER not in values:
        given = " and ".join(repr(k) for k in values)
        raise InvalidInputError(
            f"{what}: {given} can only be given with {REGION_PARAMETER!r} (the name of a "
            "registered shared memory region)")
    region = values[REGION_PARAMETER]
    if not isinstance(region, str) or not region:
        raise InvalidInputError(
            f"{what}: parameter {REGION_PARAMETER!r} must be a region's name (a non-empty "
            f"string), got {region!r}")
    if BYTE_SIZE_PARAMETER not in values:
        raise InvalidInputError(
            f"{what}: parameter {BYTE_SIZE_PARAMETER!r} must be given with "
            f"{REGION_PARAMETER!r} (the tensor's size in bytes)")
    byte_size = _integer(values[BYTE_SIZE_PARAMETER],
                         f"{what}: parameter {BYTE_SIZE_PARAMETER!r}", 0)
    offset = _integer(values.get(OFFSET_PARAMETER, 0), f"{what}: parameter {OFFSET_PARAMETER!r}",
                      0)
    return Placement(region, offset, byte_size)


def _integer(value: object, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidInputError(f"{what} must be an integer >= {least}, got {value!r}")
    return value


def _map_region(name: str, key: str, path: Path, offset: int, byte_size: int) -> Region:
    """Open ``path`` as shm_open does and map ``[offset, offset + byte_size)`` of it."""
    what = f"shared memory region {name!r}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(
            f"{what}: no POSIX shared memory object has key {key!r}; create it (shm_open) "
            "before registering it") from None
    except OSError as exc:
        reason = ("it is a symbolic link" if exc.errno == errno.ELOOP
                  else os.strerror(exc.errno or 0))
        raise InvalidInputError(
            f"{what}: cannot open shared memory object {key!r}: {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(
                f"{what}: {key!r} is not a shared memory object")
        end = offset + byte_size
        if end > info.st_size:
            raise InvalidInputError(
                f"{what}: offset {offset} + byte_size {byte_size} = {end} is past the end of "
                f"shared memory object {key!r} ({info.st_size} bytes)")
        start = offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(fd, start + byte_size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - start)
        except OSError as exc:
            raise InvalidInputError(
                f"{what}: cannot map shared memory object {key!r}: "
                f"{os.strerror(exc.errno or 0)}") from None
    finally:
        os.close(fd)
    return Region(name, key, offset, byte_size, mapping, start)
