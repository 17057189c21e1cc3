"""Model control: explicit load/unload, atomic reloads under load, repository polling."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.onnx_models import add_one_model
from support.repositories import build_test_models, write_config

from onnxserve.serving.errors import FailedPreconditionError, InvalidInputError, NotFoundError
from onnxserve.serving.models.registry import READY, UNAVAILABLE, Registry
from onnxserve.serving.settings import ServerSettings


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _registry(repository: Path, **settings) -> Registry:
    return Registry(repository, ServerSettings(model_repository=repository, warmup=False,
                                               **settings))


def _states(registry: Registry) -> dict[str, tuple[str, str]]:
    return {e.name: (e.state, e.reason) for e in registry.index()}


def test_explicit_mode_loads_only_what_it_is_told(tmp_path: Path) -> None:
    build_test_models(tmp_path)

    async def body():
        registry = _registry(tmp_path, model_control_mode="explicit", load_models=("add_one",))
        await registry.load_initial()
        assert _states(registry) == {"add_one": (READY, ""), "echo": ("", ""),
                                     "scores": ("", "")}
        assert registry.all_ready
        with pytest.raises(Exception, match="'echo' is not loaded"):
            registry.get("echo")
        await registry.load("scores")
        assert registry.get("scores")[0].name == "scores"
        await registry.unload("scores")
        assert _states(registry)["scores"] == (UNAVAILABLE, "unloaded")
        assert registry.all_ready  # an unloaded model does not make the server unready
        with pytest.raises(NotFoundError, match="not loaded"):
            await registry.unload("scores")
        with pytest.raises(InvalidInputError, match="invalid model name"):
            await registry.load("../scores")
        with pytest.raises(NotFoundError, match="no folder"):
            await registry.load("missing")
        await registry.close()

    _run(body())


def test_control_rpcs_are_refused_unless_explicit(tmp_path: Path) -> None:
    for mode in ("none", "poll"):
        with pytest.raises(FailedPreconditionError, match="--model-control-mode explicit"):
            _registry(tmp_path, model_control_mode=mode).check_control()
    _registry(tmp_path, model_control_mode="explicit").check_control()


def test_a_failed_reload_keeps_the_old_model_serving(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")

    async def body():
        registry = _registry(tmp_path)
        await registry.load_initial()
        first, _ = registry.get("m")
        write_config(tmp_path / "m", "max_batch_size: 4\nno_such_field: 1\n")
        entry = await registry.load("m")
        assert entry.state == READY and "reload failed" in entry.reason
        assert "no_such_field" in entry.reason
        assert registry.get("m")[0] is first
        (tmp_path / "m" / "config.pbtxt").unlink()
        entry = await registry.load("m")
        assert entry.reason == "" and registry.get("m")[0] is not first
        second, version = registry.get("m")
        (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"corrupted on disk")
        await registry.poll()  # the file changed: reload, which fails
        entry = {e.name: e for e in registry.entries()}["m"]
        assert entry.state == READY and "reload failed" in entry.reason
        out = await version.scheduler.infer({"x": np.ones((1, 4), np.float32)}, ["y"], 1)
        assert registry.get("m")[0] is second and (out["y"] == 2).all()
        await registry.close()

    _run(body())


def test_a_broken_model_fails_alone(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")

    async def body():
        registry = _registry(tmp_path)
        await registry.load_initial()
        states = _states(registry)
        assert states["broken"][0] == UNAVAILABLE and "model.onnx" in states["broken"][1]
        assert not registry.all_ready  # strict readiness: a wanted model is missing
        assert registry.get("echo")[0].name == "echo"
        await registry.close()

    _run(body())


def test_without_strict_readiness_models_never_make_the_server_unready(tmp_path: Path) -> None:
    """Triton's --strict-readiness false: ready while the server answers; the reason still
    names what is not loaded."""
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")

    async def body():
        strict = _registry(tmp_path)
        lenient = _registry(tmp_path, strict_readiness=False)
        assert not lenient.all_ready  # not before the start-up loads ended
        assert "the start-up loads have not ended" in lenient.readiness()[1]
        for registry in (strict, lenient):
            await registry.load_initial()
        assert not strict.all_ready and not strict.strictly_ready()
        assert "every model must load" in strict.readiness()[1]
        ready, why = lenient.readiness()
        assert ready and not lenient.strictly_ready()
        assert "0 of 1 models loaded" in why and "broken UNAVAILABLE" in why, why
        assert "ready all the same, as --strict-readiness false asks" in why, why
        for registry in (strict, lenient):
            await registry.close()
        empty = tmp_path / "empty"
        empty.mkdir()
        nothing = _registry(empty, strict_readiness=False)
        await nothing.load_initial()
        assert nothing.all_ready and "no model to serve" in nothing.readiness()[1]
        await nothing.close()

    _run(body())


def test_poll_loads_new_reloads_changed_and_unloads_removed(tmp_path: Path) -> None:
    add_one_model(tmp_path / "a" / "1" / "model.onnx")

    async def body():
        registry = _registry(tmp_path, model_control_mode="poll")
        await registry.load_initial()
        first, _ = registry.get("a")
        await registry.poll()
        assert registry.get("a")[0] is first  # unchanged: not reloaded
        add_one_model(tmp_path / "b" / "1" / "model.onnx")
        add_one_model(tmp_path / "a" / "2" / "model.onnx")
        await registry.poll()
        model, version = registry.get("a")
        assert model is not first and version.version == 2
        assert registry.get("b")[1].version == 1
        shutil.rmtree(tmp_path / "b")
        await registry.poll()
        assert _states(registry)["b"] == (UNAVAILABLE, "unloaded")
        await registry.close()

    _run(body())


def test_reload_drains_requests_admitted_to_the_old_model(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")

    async def body():
        registry = _registry(tmp_path)
        await registry.load_initial()
        old, version = registry.get("m")
        x = np.ones((1, 4), np.float32)
        admitted = [asyncio.ensure_future(version.scheduler.infer({"x": x}, ["y"], 1))
                    for _ in range(20)]
        await registry.load("m")  # swaps while the 20 are queued or running
        results = await asyncio.gather(*admitted)
        assert all((r["y"] == 2).all() for r in results)
        new, _ = registry.get("m")
        assert new is not old
        await registry.close()

    _run(body())
