"""Shared fixtures: test model repositories and a real server started as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory as mpshm
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from onnx_models import add_one_model, echo_model, scores_model

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.serving.process import ServerProcess, free_port, onnxserve_command

__all__ = ["ROOT", "ServerProcess", "free_port", "onnxserve_command", "start_server"]

ROOT = Path(__file__).resolve().parent.parent
SCORES_LABELS = ["cat", "dog", "bird", "fish", "horse"]


def start_server(
    repository: Path, log_path: Path, *extra: str, timeout: float = 60.0,
    token: str | None = None,
) -> ServerProcess:
    """Start `onnxserve serve` on a free localhost port and wait until loading is done
    (every model loaded or failed: tests look at both)."""
    server = ServerProcess.serve(repository, *extra, log_path=log_path)

    def loaded() -> bool:
        try:
            with Client(server.url, timeout=2.0, token=token) as client:
                return all(m["state"] != "LOADING" for m in client.models())
        except InferenceServerError:
            return False

    server.wait_started(timeout, loaded)
    return server


def write_config(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)


def build_test_models(repository: Path) -> None:
    """echo (full config), add_one (no config: auto-completed), scores (labels)."""
    echo_model(repository / "echo" / "1" / "model.onnx")
    inputs = "".join(
        f'input {{ name: "in_{t}" data_type: TYPE_{"STRING" if t == "BYTES" else t} dims: [2] }}\n'
        for t in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                  "INT64", "FP16", "FP32", "FP64", "BYTES")
    )
    write_config(repository / "echo", f'name: "echo"\nbackend: "onnxruntime"\n'
                 f"max_batch_size: 8\n{inputs}")
    add_one_model(repository / "add_one" / "1" / "model.onnx")
    add_one_model(repository / "add_one" / "2" / "model.onnx")
    scores_model(repository / "scores" / "1" / "model.onnx", classes=len(SCORES_LABELS))
    write_config(repository / "scores", (
        'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'input { name: "scores_in" data_type: TYPE_FP32 dims: [5] }\n'
        'output { name: "scores" data_type: TYPE_FP32 dims: [5] label_filename: "labels.txt" }\n'
        'parameters { key: "onnxserve.note" value { string_value: "test model" } }\n'
    ))
    (repository / "scores" / "labels.txt").write_text("\n".join(SCORES_LABELS) + "\n")


@dataclass
class ExportedLenet5:
    repository: Path
    output: str


@pytest.fixture(scope="session")
def lenet5_export(tmp_path_factory: pytest.TempPathFactory) -> ExportedLenet5:
    """LeNet-5 trained on the bundled digits and exported, once per test session."""
    repository = tmp_path_factory.mktemp("repository")
    result = subprocess.run(
        onnxserve_command("export", "lenet5", "--dataset", "digits",
                          "--model-repository", str(repository)),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return ExportedLenet5(repository, result.stdout)


@pytest.fixture(scope="session")
def repository(lenet5_export: ExportedLenet5) -> Path:
    """The exported LeNet-5 plus the small test models, in one repository."""
    build_test_models(lenet5_export.repository)
    return lenet5_export.repository


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    subprocess.run(onnxserve_command("samples", "--out", str(out)), check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def test_models_server(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of the small test models (build_test_models), one per test module (a module
    may change its state: log settings, shared memory regions, loads), started with the
    module's ``SERVER_FLAGS`` (a tuple of serve flags, if it has one); its log must hold no
    traceback when the module is done."""
    repository = tmp_path_factory.mktemp("test_models")
    build_test_models(repository)
    flags = getattr(request.module, "SERVER_FLAGS", ())
    server = start_server(repository, repository / "server.log", *flags)
    yield server
    server.stop()
    assert "Traceback" not in server.output()


@pytest.fixture(scope="session")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(repository, tmp_path_factory.mktemp("logs") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, timeout=30.0) as c:
        yield c


@pytest.fixture
def block(request: pytest.FixtureRequest) -> Iterator[mpshm.SharedMemory]:
    """A 4 KiB POSIX shared memory object named for the test, unlinked afterwards."""
    created = mpshm.SharedMemory(f"onnxserve_test_{os.getpid()}_{request.node.name[:30]}",
                                 create=True, size=4096)
    yield created
    created.close()
    created.unlink()
