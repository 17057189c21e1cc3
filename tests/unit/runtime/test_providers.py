"""Execution provider choice: never a silent fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support.onnx_models import add_one_model

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.runtime.instance import SessionInstance
from onnxserve.serving.runtime.providers import (
    CPU,
    CUDA,
    check_active,
    usable_gpus,
)


def test_cuda_mode_fails_when_session_fell_back() -> None:
    with pytest.raises(RuntimeError, match="CUDA execution provider was requested"):
        check_active("cuda", [CUDA, CPU], [CPU], "m")
    assert check_active("cuda", [CUDA, CPU], [CUDA, CPU], "m") == CUDA


def test_auto_mode_falls_back_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert check_active("auto", [CUDA, CPU], [CPU], "m") == CPU
    assert "falls back to CPUExecutionProvider" in caplog.text


def test_a_gpu_instance_fails_its_load_where_cuda_cannot_run(tmp_path: Path) -> None:
    import onnxruntime as ort

    from onnxserve.serving.runtime.devices import Device

    path = add_one_model(tmp_path / "m.onnx")
    if usable_gpus()[0]:
        assert SessionInstance(path, model_name="m", providers="cuda",
                               device=Device("gpu", 0)).provider == CUDA
        return
    if CUDA not in ort.get_available_providers():
        with pytest.raises(ModelLoadError, match="needs onnxruntime's CUDA execution provider"):
            SessionInstance(path, model_name="m", providers="cuda", device=Device("gpu", 0))
    else:  # the provider is there but CUDA is not usable: the session check catches it
        with pytest.raises(ModelLoadError, match="CUDA"):
            SessionInstance(path, model_name="m", providers="cuda", device=Device("gpu", 0))


def test_the_cuda_probe_gives_a_reason_when_there_is_no_gpu() -> None:
    count, why_not = usable_gpus()
    assert count >= 0
    assert bool(why_not) == (count == 0)
