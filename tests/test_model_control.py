"""Model control: explicit load/unload, atomic reloads under load, repository polling."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build_test_models, start_server, write_config
from onnx_models import add_one_model

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
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


def _infer_loop(url: str, stop: threading.Event, outcome: dict) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    request = pb.ModelInferRequest(model_name="add_one")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                response = stub.ModelInfer(request, timeout=30)
            except grpc.RpcError as exc:
                outcome["errors"].append(f"{exc.code()}: {exc.details()}")
                continue
            y = np.frombuffer(response.raw_output_contents[0], np.float32)
            if not np.array_equal(y, x.ravel() + 1):
                outcome["errors"].append(f"wrong answer {y}")
            outcome["ok"] += 1
            outcome["versions"].add(response.model_version)


def test_twenty_reloads_under_load_fail_no_request(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log", "--model-control-mode",
                          "explicit", "--load-model", "add_one", "--load-model", "echo")
    stop = threading.Event()
    outcome: dict = {"ok": 0, "errors": [], "versions": set()}
    threads = [threading.Thread(target=_infer_loop, args=(server.url, stop, outcome))
               for _ in range(4)]
    try:
        for t in threads:
            t.start()
        with Client(server.url) as client:
            time.sleep(0.5)
            for i in range(20):
                # Each reload finds a newer version folder: the policy serves only it.
                shutil.copytree(tmp_path / "add_one" / "1", tmp_path / "add_one" / str(i + 3))
                client.load_model("add_one")
                assert client.model_metadata("add_one").versions == (str(i + 3),)
                time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        server.stop()
    print(f"reloads under load: {outcome['ok']} requests answered, "
          f"{len(outcome['errors'])} failed, {len(outcome['versions'])} versions served")
    assert outcome["errors"] == []
    assert outcome["ok"] > 100
    assert len(outcome["versions"]) >= 10  # requests really moved to the new loads
    assert "model_reloaded model=add_one" in server.output()


def test_control_rpcs_over_grpc(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    write_config(tmp_path / "bad", "max_batch_size: 4\nbogus: 1\n")
    add_one_model(tmp_path / "bad" / "1" / "model.onnx")
    server = start_server(tmp_path, tmp_path / "server.log", "--model-control-mode",
                          "explicit", "--load-model", "echo")
    try:
        with Client(server.url) as client:
            assert client.is_server_ready() and not client.is_model_ready("scores")
            with pytest.raises(InferenceServerError) as err:
                client.infer("scores", {"scores_in": np.zeros((1, 5), np.float32)})
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            client.load_model("scores")
            assert client.is_model_ready("scores")
            with pytest.raises(InferenceServerError) as err:
                client.load_model("bad")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "bogus" in err.value.message
            with pytest.raises(InferenceServerError) as err:
                client.load_model("nope")
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(InferenceServerError) as err:
                client.load_model("../echo")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert not client.is_server_ready()  # "bad" was asked for and failed
            index = {m["name"]: m for m in client.models()}
            assert index["bad"]["state"] == "UNAVAILABLE" and "bogus" in index["bad"]["reason"]
            client.unload_model("bad")
            client.unload_model("scores")
            assert not client.is_model_ready("scores") and client.is_server_ready()
            assert {m["name"]: m["state"] for m in client.models()}["add_one"] == ""
        script = (
            "import sys, json, tritonclient.grpc as t\n"
            "c = t.InferenceServerClient(sys.argv[1])\n"
            "c.load_model('add_one')\n"
            "ready = c.is_model_ready('add_one')\n"
            "c.unload_model('add_one')\n"
            "index = c.get_model_repository_index(as_json=True)['models']\n"
            "print(json.dumps([ready, c.is_model_ready('add_one'), index]))\n"
        )
        result = subprocess.run([sys.executable, "-c", script, server.url], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        import json

        ready, after, index = json.loads(result.stdout)
        assert ready and not after
        assert {m["name"]: m.get("state", "") for m in index}["add_one"] == "UNAVAILABLE"
    finally:
        server.stop()


def test_control_rpcs_are_refused_by_default(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(server.url) as client, pytest.raises(InferenceServerError) as err:
            client.unload_model("echo")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "explicit" in err.value.message
    finally:
        server.stop()


def test_poll_mode_serves_a_model_copied_in_later(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log", "--model-control-mode", "poll",
                          "--repository-poll-secs", "0.2")
    try:
        add_one_model(tmp_path / "late" / "1" / "model.onnx")
        with Client(server.url) as client:
            deadline = time.monotonic() + 30
            while not client.is_model_ready("late") and time.monotonic() < deadline:
                time.sleep(0.1)
            out = client.infer("late", {"x": np.zeros((1, 4), np.float32)})
            np.testing.assert_array_equal(out["y"], np.ones((1, 4)))
    finally:
        server.stop()
