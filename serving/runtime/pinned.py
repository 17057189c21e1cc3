"""Page-locked (pinned) host buffers, so a batch's copy to the GPU is one DMA transfer.

A pageable buffer makes the CUDA driver stage the copy through its own pinned memory,
chunk by chunk; a buffer registered with ``cudaHostRegister`` is copied directly. The CUDA
runtime is the one onnxruntime's CUDA provider loaded; without it, buffers stay pageable.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import weakref

import numpy as np

log = logging.getLogger(__name__)

_RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context
#: registrations cover whole pages, so two buffers never share one
PAGE = 4096


@functools.cache
def _cuda_runtime() -> ctypes.CDLL | None:
    for name in _RUNTIME_NAMES:
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        runtime.cudaHostRegister.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
        runtime.cudaHostUnregister.argtypes = (ctypes.c_void_p,)
        return runtime
    return None


def pinned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """An uninitialised array in pinned memory, or None when pinning is not available."""
    runtime = _cuda_runtime()
    if runtime is None:
        return None
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    span = -(-nbytes // PAGE) * PAGE  # whole pages
    raw = np.empty(span + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    pages = raw[start:start + span]
    pointer = pages.ctypes.data
    status = runtime.cudaHostRegister(pointer, span, _PORTABLE)
    if status != 0:
        log.warning("cudaHostRegister of %d bytes failed (CUDA error %d); the buffer stays "
                    "pageable", span, status)
        return None
    weakref.finalize(raw, runtime.cudaHostUnregister, pointer)
    return pages[:nbytes].view(dtype).reshape(shape)


def host_buffer(shape: tuple[int, ...], dtype: np.dtype, pinned: bool) -> np.ndarray:
    """A host buffer, pinned when asked for and possible."""
    if pinned:
        array = pinned_empty(shape, dtype)
        if array is not None:
            return array
    return np.empty(shape, dtype)
