"""Model control on a running server: reloads under load, the control RPCs over gRPC (and
refused unless --model-control-mode explicit), a model copied into a polled repository
(the registry on its own: tests/unit/models/test_model_control.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.onnx_models import add_one_model
from support.repositories import build_test_models, write_config
from support.served import start_server

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc


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
