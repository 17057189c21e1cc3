"""Execution provider choice for onnxruntime sessions, with no silent fallback.

onnxruntime quietly runs a session on the CPU when the CUDA provider is listed but its
libraries are missing (onnxruntime issue 23372), so CUDA is probed once with a tiny graph
before any model is placed on a GPU, and every session's choice is checked against
``session.get_providers()`` after it exists.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.runtime.devices import Device, cuda_device_count
from onnxserve.serving.runtime.sessions import GpuSettings

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_PROBE_MODEL = Path(__file__).resolve().parent / "kernels" / "topk_float32.onnx"

ProviderChain = list[tuple[str, dict[str, str]]]


@functools.cache
def usable_gpus() -> tuple[int, str]:
    """How many GPUs onnxruntime's CUDA provider can run on, and why none when it is 0.

    Checked by starting a session of a tiny graph on GPU 0: listing the provider is not
    enough, since a session without its CUDA 13 / cuDNN 9 libraries falls back to the CPU.
    """
    available = ort.get_available_providers()
    if CUDA not in available:
        return 0, "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
    count = cuda_device_count()
    if count == 0:
        return 0, "no GPU is visible to the CUDA driver"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # CUDA and cuDNN from the nvidia-* wheels, where installed
        try:
            preload()
        except Exception as exc:  # the libraries may come from the system instead
            log.debug("onnxruntime.preload_dlls: %s", exc)
    try:
        probe = ort.InferenceSession(str(_PROBE_MODEL), providers=[(CUDA, {"device_id": "0"}), CPU])
    except Exception as exc:
        return 0, f"the CUDA execution provider failed to start ({exc})"
    if probe.get_providers()[0] != CUDA:
        return 0, ("onnxruntime could not load the CUDA execution provider's libraries "
                   "(it needs CUDA 13 and cuDNN 9)")
    return count, ""


def announce(mode: str) -> tuple[int, str]:
    """Probe the GPUs once at start-up and say loudly when CUDA is installed but unusable."""
    count, why_not = usable_gpus()
    if mode != "cpu" and count == 0 and CUDA in ort.get_available_providers():
        log.warning("the CUDA execution provider is installed but not usable: %s; "
                    "--providers %s %s", why_not, mode,
                    "fails every GPU model" if mode == "cuda" else "runs models on the CPU")
    elif mode != "cpu" and count:
        log.info("CUDA is usable on %d GPU(s)", count)
    return count, why_not


def provider_chain(device: Device, gpu: GpuSettings, available: Sequence[str]) -> ProviderChain:
    """The providers and their options for one instance's session, preferred first."""
    if not device.is_gpu:
        return [(CPU, {})]
    if CUDA not in available:
        raise ModelLoadError("a GPU instance needs onnxruntime's CUDA execution provider, which "
                             f"this build lacks (available: {', '.join(available)})")
    chain: ProviderChain = []
    if gpu.tensorrt is not None:
        if TENSORRT in available:
            chain.append((TENSORRT, {"device_id": str(device.id), **gpu.tensorrt}))
        else:
            log.warning("TensorRT was asked for but this onnxruntime build has no TensorRT "
                        "execution provider; running on CUDA")
    chain.append((CUDA, {"device_id": str(device.id), **gpu.cuda}))
    chain.append((CPU, {}))
    return chain


def check_active(mode: str, requested: Sequence[str], active: Sequence[str], model: str) -> str:
    """Compare what was asked for with what the session runs on; return the provider in use.

    ``cuda`` mode raises when CUDA did not activate; ``auto`` logs a warning and uses the CPU.
    A TensorRT provider that did not start (libraries missing) leaves CUDA, with a warning.
    """
    in_use = active[0] if active else CPU
    if TENSORRT in requested and in_use != TENSORRT and in_use == CUDA:
        log.warning("model %r: the TensorRT execution provider did not start (TensorRT "
                    "libraries missing?); the model runs on CUDA", model)
    if CUDA in requested and CUDA not in active:
        reason = (
            f"model {model!r}: the CUDA execution provider was requested but onnxruntime "
            f"started the session on {', '.join(active) or 'nothing'} (CUDA 13 and cuDNN 9 "
            "libraries missing, or no usable GPU)"
        )
        if mode == "cuda":
            raise RuntimeError(reason)
        log.warning("%s; --providers auto falls back to %s", reason, in_use)
    return in_use
