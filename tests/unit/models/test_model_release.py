"""A retired model version lets go of everything when its drain ends.

Reloading a model (poll mode's new version folder or changed config, explicit mode's load,
unload, a load that fails part-way) must leave no onnxruntime session, thread, buffer or
metric series of the version it replaced: a server reloading every few seconds otherwise
grows by a session's weights and threads per reload. The in-process tests keep Python's
cyclic garbage collector off, so a version kept alive by a reference cycle (which only
that collector would free, rarely) shows up at once; sessions are counted, threads are
the process's own (/proc/self/task: onnxruntime's threads are native ones).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest
from support.onnx_models import add_one_model
from support.repositories import write_config

from onnxserve.serving.errors import ModelLoadError, UnavailableError
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.registry import Registry
from onnxserve.serving.observability.metrics import Metrics
from onnxserve.serving.runtime.instance import SessionInstance
from onnxserve.serving.settings import ServerSettings

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="counts threads in /proc (Linux)")

X = np.ones((1, 4), np.float32)


def _threads(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _sessions() -> int:
    return sum(isinstance(o, ort.InferenceSession) for o in gc.get_objects())


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cyclic garbage collector off: what is not freed by reference counting stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _settings(tmp_path: Path, **overrides) -> ServerSettings:
    # two threads per session: each onnxruntime session kept alive keeps a native thread
    return ServerSettings(model_repository=tmp_path, warmup=False, intra_op_threads=2,
                          **overrides)


async def _run_with_one_loader_thread(body) -> None:
    # Model loads run in the default executor: one thread, so its count never varies.
    executor = ThreadPoolExecutor(1)
    asyncio.get_running_loop().set_default_executor(executor)
    await asyncio.wait_for(body(), 120)


async def _infer(registry: Registry) -> int:
    _, version = registry.get("m")
    out = await version.scheduler.infer({"x": X}, ["y"], 1)
    np.testing.assert_array_equal(out["y"], X + 1)
    return version.version


def _watch(registry: Registry, kept: list[tuple[str, weakref.ref]]) -> None:
    model, version = registry.get("m")
    kept.extend([(f"model version {version.version}", weakref.ref(model)),
                 (f"ModelVersion {version.version}", weakref.ref(version)),
                 (f"scheduler of version {version.version}", weakref.ref(version.scheduler)),
                 *((f"instance of version {version.version}", weakref.ref(r))
                   for r in version.instances)])


async def _all_released(kept: list[tuple[str, weakref.ref]]) -> list[str]:
    """What is still alive once the retired versions' drains had time to end (idle
    versions drain at once; the bound is generous and not a timing assertion)."""
    deadline = time.monotonic() + 10
    while True:
        alive = [what for what, ref in kept if ref() is not None]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.01)


def test_poll_reloads_release_each_retired_version(tmp_path: Path) -> None:
    """Twenty poll-mode reloads, each a new version folder (same file, new number) with
    the old one removed: no retired model, scheduler, instance, session, thread or metric
    series stays."""
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    metrics = Metrics()

    async def body() -> None:
        registry = Registry(tmp_path, _settings(tmp_path, model_control_mode="poll"),
                            metrics=metrics)
        await registry.load_initial()
        await _infer(registry)
        kept: list[tuple[str, weakref.ref]] = []
        with _no_cycle_collection():
            threads, sessions = _threads(), _sessions()
            for number in range(2, 22):
                _watch(registry, kept)
                shutil.copytree(tmp_path / "m" / str(number - 1), tmp_path / "m" / str(number))
                shutil.rmtree(tmp_path / "m" / str(number - 1))
                await registry.poll()
                assert await _infer(registry) == number
            assert await _all_released(kept) == []
            assert _sessions() <= sessions
            assert _threads() <= threads
        exposed = generate_latest(metrics.registry).decode()
        assert 'onnxserve_inferences_total{model="m",version="21"} 1.0' in exposed
        retired = [line for line in exposed.splitlines()
                   if 'model="m"' in line and 'version="21"' not in line]
        assert retired == []  # the retired versions' series are gone, as in Triton
        await registry.close()

    asyncio.run(_run_with_one_loader_thread(body))


def test_config_reloads_and_explicit_unload_release_the_old_load(tmp_path: Path) -> None:
    """The same in explicit mode: reloads of the same version after its config changed,
    then unload and load again; a reload of the same version keeps adding to its metrics."""
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    metrics = Metrics()

    async def body() -> None:
        registry = Registry(tmp_path, _settings(tmp_path, model_control_mode="explicit"),
                            metrics=metrics)
        await registry.load("m")
        await _infer(registry)
        kept: list[tuple[str, weakref.ref]] = []
        with _no_cycle_collection():
            threads, sessions = _threads(), _sessions()
            for size in range(2, 12):
                _watch(registry, kept)
                write_config(tmp_path / "m", f"max_batch_size: {size}\n")
                await registry.load("m")
                assert registry.get("m")[0].config.max_batch_size == size
                await _infer(registry)
            _watch(registry, kept)
            await registry.unload("m")
            assert await _all_released(kept) == []
            assert _sessions() <= sessions - 1  # the one loaded at the start, unloaded
            assert 'model="m"' not in generate_latest(metrics.registry).decode()
            await registry.load("m")
            await _infer(registry)
            assert _sessions() <= sessions
            assert _threads() <= threads
        exposed = generate_latest(metrics.registry).decode()
        assert 'onnxserve_inferences_total{model="m",version="1"} 1.0' in exposed
        await registry.close()

    asyncio.run(_run_with_one_loader_thread(body))


def test_a_same_version_reload_keeps_its_metrics(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    metrics = Metrics()

    async def body() -> None:
        registry = Registry(tmp_path, _settings(tmp_path, model_control_mode="explicit"),
                            metrics=metrics)
        for _ in range(3):
            await registry.load("m")  # the second and third load replace the first
            await _infer(registry)
        exposed = generate_latest(metrics.registry).decode()
        assert 'onnxserve_inferences_total{model="m",version="1"} 3.0' in exposed
        await registry.close()

    asyncio.run(_run_with_one_loader_thread(body))


def test_a_load_that_fails_part_way_releases_what_it_built(tmp_path: Path) -> None:
    """Version 1 builds (sessions, scheduler, metrics), version 2 has other inputs: the
    load fails, and nothing of version 1 stays, even while the error is kept (a caller,
    a log handler)."""
    add_one_model(tmp_path / "m" / "1" / "model.onnx", size=4)
    add_one_model(tmp_path / "m" / "2" / "model.onnx", size=8)
    write_config(tmp_path / "m", "max_batch_size: 4\nversion_policy { all {} }\n")
    metrics = Metrics()
    with _no_cycle_collection():
        sessions = _sessions()
        with pytest.raises(ModelLoadError, match="different inputs") as failure:
            load_model(tmp_path, "m", _settings(tmp_path), metrics)
        assert failure.value.__traceback__ is not None  # the error, and its frames, kept
        assert _sessions() <= sessions
        assert 'model="m"' not in generate_latest(metrics.registry).decode()


def test_a_closed_runner_refuses_to_run(tmp_path: Path) -> None:
    path = add_one_model(tmp_path / "m.onnx")
    instance = SessionInstance(path, model_name="m")
    session = weakref.ref(instance._session)
    instance.close()
    instance.close()  # a second close does nothing
    assert session() is None
    with pytest.raises(UnavailableError, match=r"'m'.*closed"):
        instance.run({"x": X})
    with pytest.raises(UnavailableError, match="closed"):
        instance.run_with_top_k({"x": X}, ["y"], {"z": 1})
