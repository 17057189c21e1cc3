"""Execution provider choice for onnxruntime sessions, with no silent fallback.

onnxruntime quietly runs a session on the CPU when the CUDA provider is listed but its
libraries are missing, so the choice is checked against ``session.get_providers()``
after the session exists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def requested_providers(mode: str, available: Sequence[str]) -> list[str]:
    """The provider list to create a session with for ``mode`` (auto, cpu or cuda)."""
    if mode == "cpu":
        return [CPU]
    if mode == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                "--providers cuda: this onnxruntime build has no CUDA execution provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu"
            )
        return [CUDA, CPU]
    if mode == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise ValueError(f"unknown provider mode {mode!r}; expected auto, cpu or cuda")


def check_active(mode: str, requested: Sequence[str], active: Sequence[str], model: str) -> str:
    """Compare what was asked for with what the session runs on; return the provider in use.

    ``cuda`` mode raises when CUDA did not activate; ``auto`` logs a warning and uses the CPU.
    """
    in_use = active[0] if active else CPU
    if CUDA in requested and in_use != CUDA:
        reason = (
            f"model {model!r}: the CUDA execution provider was requested but onnxruntime "
            f"started the session on {', '.join(active) or 'nothing'} (CUDA 13 and cuDNN 9 "
            "libraries missing, or no usable GPU)"
        )
        if mode == "cuda":
            raise RuntimeError(reason)
        log.warning("%s; --providers auto falls back to %s", reason, in_use)
    return in_use
