"""Execution provider choice: never a silent fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from onnx_models import add_one_model

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.providers import CPU, CUDA, check_active, requested_providers
from onnxserve.serving.runner import Runner


def test_requested_providers() -> None:
    assert requested_providers("cpu", [CUDA, CPU]) == [CPU]
    assert requested_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert requested_providers("auto", [CPU]) == [CPU]
    assert requested_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(RuntimeError, match="no CUDA execution provider"):
        requested_providers("cuda", [CPU])


def test_cuda_mode_fails_when_session_fell_back() -> None:
    with pytest.raises(RuntimeError, match="CUDA execution provider was requested"):
        check_active("cuda", [CUDA, CPU], [CPU], "m")
    assert check_active("cuda", [CUDA, CPU], [CUDA, CPU], "m") == CUDA


def test_auto_mode_falls_back_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert check_active("auto", [CUDA, CPU], [CPU], "m") == CPU
    assert "falls back to CPUExecutionProvider" in caplog.text


def test_cuda_mode_fails_the_load_on_this_machine(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = add_one_model(tmp_path / "m.onnx")
    if CUDA in ort.get_available_providers():
        try:
            runner = Runner(path, model_name="m", providers="cuda")
        except ModelLoadError as exc:
            assert "CUDA" in str(exc)
        else:
            assert runner.provider == CUDA
        return
    with pytest.raises(ModelLoadError, match="no CUDA execution provider"):
        Runner(path, model_name="m", providers="cuda")
