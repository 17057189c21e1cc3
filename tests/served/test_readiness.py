"""Ready only when serving: an empty repository, a misspelt --load-model, KServe's layout.

An orchestrator routes traffic to a replica that reports ready and retires the others, so a
server that would answer every request NOT_FOUND must not say it is ready, and a start-up
that names a model the repository does not hold must fail at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.onnx_models import add_one_model
from support.repositories import write_config
from support.served import start_server

from onnxserve.clients.client import Client
from onnxserve.serving.models.repository import list_models
from onnxserve.serving.process import ServerProcess, free_port, onnxserve_command

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)


def _health(url: str, service: str = "") -> str:
    with grpc.insecure_channel(url) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_an_empty_repository_is_live_but_not_ready(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    server = start_server(tmp_path / "models", tmp_path / "server.log")
    try:
        with Client(server.url) as client:
            assert client.is_server_live() and not client.is_server_ready()
        assert _health(server.url) == "NOT_SERVING"
        assert _health(server.url, "liveness") == "SERVING"
        assert "holds no model folders" in server.output()
        assert "not ready: no model to serve in" in server.output()
        assert "ready: 0 of 0" not in server.output()
    finally:
        assert server.stop() == 0


def test_the_start_up_line_says_why_the_server_is_not_ready(tmp_path: Path) -> None:
    _one_bad_model(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        with Client(server.url) as client:
            assert not client.is_server_ready()
        line = _readiness_line(server)
        assert "not ready: 1 of 2 models loaded" in line and "NOT_SERVING" in line, line
    finally:
        assert server.stop() == 0


def _one_bad_model(folder: Path) -> None:
    add_one_model(folder / "add_one" / "1" / "model.onnx")
    write_config(folder / "broken", "max_batch_size: 4\nnot_a_field: 1\n")


def _readiness_line(server: ServerProcess) -> str:
    """The one readiness line logged: a warning that names the bad model and why."""
    (line,) = [x for x in server.output().splitlines() if "ready:" in x]
    assert "WARNING" in line and "broken UNAVAILABLE" in line and "not_a_field" in line, line
    return line


@pytest.mark.parametrize("flag", [("--strict-readiness", "false"), ("--strict-readiness=0",),
                                  ("env",)])
def test_without_strict_readiness_one_bad_model_leaves_the_server_ready(
        tmp_path: Path, flag: tuple[str, ...]) -> None:
    """Triton's --strict-readiness false: replicas sharing a repository with one bad model
    stay behind the load balancer; the bad model alone is not ready."""
    _one_bad_model(tmp_path)
    if flag == ("env",):
        os.environ["ONNXSERVE_STRICT_READINESS"] = "false"
    try:
        server = start_server(tmp_path, tmp_path / "server.log",
                              *(() if flag == ("env",) else flag))
    finally:
        os.environ.pop("ONNXSERVE_STRICT_READINESS", None)
    try:
        with Client(server.url) as client:
            assert client.is_server_ready()
            assert client.is_model_ready("add_one") and not client.is_model_ready("broken")
        assert _health(server.url) == "SERVING"
        assert _health(server.url, "broken") == "NOT_SERVING"
        http = urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10)
        assert http.status == 200
        import tritonclient.http as triton_http

        triton = triton_http.InferenceServerClient(str(server.http_url))
        try:  # as a Triton user's client sees it
            assert triton.is_server_ready() and triton.is_model_ready("add_one")
            assert not triton.is_model_ready("broken")
        finally:
            triton.close()
        line = _readiness_line(server)
        assert "ready: 1 of 2 models loaded" in line and "ready all the same" in line, line
        assert "readiness answers SERVING" in line, line
    finally:
        assert server.stop() == 0


def test_a_bad_model_polled_in_later_is_logged_with_what_readiness_answers(
        tmp_path: Path) -> None:
    """A folder copied into a polled repository with the old name in its config: the
    server goes not ready, and its log says so and why."""
    add_one_model(tmp_path / "add_one" / "1" / "model.onnx")
    server = start_server(tmp_path, tmp_path / "server.log", "--model-control-mode", "poll",
                          "--repository-poll-secs", "0.2")
    try:
        with Client(server.url) as client:
            assert client.is_server_ready()
            shutil.copytree(tmp_path / "add_one", tmp_path / "add_two")
            write_config(tmp_path / "add_two", 'name: "add_one"\n')
            deadline = time.monotonic() + 30
            while client.is_server_ready():
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.1)
        deadline = time.monotonic() + 10
        while "add_two UNAVAILABLE" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        # each change is logged: add_two LOADING, then add_two UNAVAILABLE and why
        line = [x for x in server.output().splitlines() if "not ready:" in x][-1]
        assert "not ready: 1 of 2 models loaded" in line, line
        assert "add_two UNAVAILABLE" in line and "name is 'add_one'" in line, line
        assert "NOT_SERVING" in line, line
        assert "ready: 1 of 1 models loaded" in server.output()
    finally:
        assert server.stop() == 0


def test_explicit_mode_with_nothing_asked_for_starts_ready_and_empty(tmp_path: Path) -> None:
    add_one_model(tmp_path / "add_one" / "1" / "model.onnx")
    write_config(tmp_path / "broken", "max_batch_size: 4\nnot_a_field: 1\n")
    server = start_server(tmp_path, tmp_path / "server.log", "--model-control-mode", "explicit")
    try:
        with Client(server.url) as client:
            assert client.is_server_ready()  # asked to start empty, waiting for loads
            assert "ready: no model loaded, as asked" in server.output()
            with pytest.raises(Exception, match="not_a_field"):
                client.load_model("broken")
            assert not client.is_server_ready()  # asked for a model that failed
            client.unload_model("broken")
            client.load_model("add_one")
            assert client.is_server_ready()
    finally:
        server.stop()


@pytest.mark.parametrize("names", [["lenet_5"], ["add_one", "add_on"]])
def test_a_misspelt_load_model_stops_the_start(tmp_path: Path, names: list[str]) -> None:
    add_one_model(tmp_path / "add_one" / "1" / "model.onnx")
    add_one_model(tmp_path / "lenet5" / "1" / "model.onnx")
    flags = [f"--load-model={n}" for n in names]
    result = subprocess.run(
        onnxserve_command("serve", "--model-repository", str(tmp_path), "--grpc-host",
                          "127.0.0.1", "--grpc-port", str(free_port()), "--metrics-port", "0",
                          "--model-control-mode", "explicit", *flags),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    missing = names[-1]
    assert f"--load-model {missing!r}: no such model in the model repository" in result.stderr
    assert "it holds add_one, lenet5" in result.stderr
    assert "Traceback" not in result.stderr and "gRPC server listening" not in result.stderr


def _single_file_repository(root: Path) -> Path:
    """KServe's storage initializer: the storageUri's one file in /mnt/models."""
    folder = root / "models"
    add_one_model(folder / "model.onnx")
    return folder


def test_kserves_single_file_layout_is_served_as_a_model(tmp_path: Path) -> None:
    folder = _single_file_repository(tmp_path)
    for flags, name in (((), "models"), (("--model-name", "adder"), "adder")):
        server = start_server(folder, tmp_path / "server.log", *flags)
        try:
            with Client(server.url) as client:
                assert client.is_server_ready() and client.is_model_ready(name)
                assert [(m["name"], m["state"]) for m in client.models()] == [(name, "READY")]
                out = client.infer(name, {"x": np.zeros((2, 4), np.float32)})
                np.testing.assert_array_equal(out["y"], np.ones((2, 4)))
                assert client.model_metadata(name).versions == ("1",)
        finally:
            server.stop()
    assert _health_after_env_name(folder, tmp_path) == "SERVING"


def _health_after_env_name(folder: Path, tmp_path: Path) -> str:
    """The name also comes from ONNXSERVE_MODEL_NAME (KServe passes the InferenceService's)."""
    os.environ["ONNXSERVE_MODEL_NAME"] = "from_env"
    try:
        server = start_server(folder, tmp_path / "env.log")
    finally:
        del os.environ["ONNXSERVE_MODEL_NAME"]
    try:
        return _health(server.url, "from_env")
    finally:
        server.stop()


def test_single_file_layout_takes_a_config_and_labels_beside_the_file(tmp_path: Path) -> None:
    folder = _single_file_repository(tmp_path)
    write_config(folder, 'max_batch_size: 2\noutput { name: "y" label_filename: "labels.txt" }'
                         "\ndynamic_batching { }\n")
    (folder / "labels.txt").write_text("a\nb\nc\nd\n")
    server = start_server(folder, tmp_path / "server.log", "--model-name", "adder")
    try:
        with Client(server.url) as client:
            x = np.array([[0, 3, 1, 2]], np.float32)
            top = client.infer("adder", {"x": x}, ["y"], classification=1)["y"]
            assert top.tolist() == [[b"4.000000:1:b"]]
            assert client.model_metadata("adder").inputs[0].shape == (-1, 4)
    finally:
        server.stop()


def test_a_root_onnx_file_beside_model_folders_is_not_a_model(tmp_path: Path) -> None:
    folder = _single_file_repository(tmp_path)
    shutil.copy(folder / "model.onnx", tmp_path / "spare.onnx")
    add_one_model(folder / "adder" / "1" / "model.onnx")
    assert list_models(folder) == ["adder"]
    assert list_models(tmp_path / "models", "x") == ["adder"]
    (folder / "adder" / "1" / "model.onnx").unlink()
    (folder / "adder" / "1").rmdir()
    (folder / "adder").rmdir()
    assert list_models(folder) == ["models"] and list_models(folder, "x") == ["x"]
    (folder / "second.onnx").write_bytes(b"")
    assert list_models(folder) == []  # two files: which one is the model is not guessed


def test_a_missing_repository_suggests_an_export_that_works_offline(tmp_path: Path) -> None:
    missing = tmp_path / "my models"
    result = subprocess.run(
        onnxserve_command("serve", "--model-repository", str(missing)),
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "is not a folder" in result.stderr
    # the recipe's default data set is downloaded; the bundled digits are not
    assert (f"onnxserve export lenet5 --dataset digits --model-repository '{missing}'"
            in result.stderr), result.stderr
    assert "Traceback" not in result.stderr
