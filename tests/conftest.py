"""Shared fixtures: test model repositories and a real server started as a subprocess.

The helpers behind them live in support/ (``from support.served import start_server``, ...):
test modules import those, never this file. tests/unit/conftest.py adds the guard that keeps
unit tests from starting a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing import shared_memory as mpshm
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.repositories import ExportedLenet5, build_test_models
from support.served import start_server

from onnxserve.clients.client import Client
from onnxserve.serving.process import ServerProcess, onnxserve_command


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
    module's ``SERVER_FLAGS`` (a tuple of serve flags, if it has one) and, when the module
    sets ``SERVER_METRICS = True``, its metrics endpoint (``server.metrics_port``); its log
    must hold no traceback when the module is done."""
    repository = tmp_path_factory.mktemp("test_models")
    build_test_models(repository)
    flags = getattr(request.module, "SERVER_FLAGS", ())
    server = start_server(repository, repository / "server.log", *flags,
                          metrics=getattr(request.module, "SERVER_METRICS", False))
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
