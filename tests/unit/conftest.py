"""Unit tests start no server: the guard that keeps them honest.

While a test under tests/unit/ runs (its setup, fixtures of every scope included, its call and
its teardown), starting a server fails the test with an AssertionError naming it: a socket
that listens (an in-process HTTP or raw TCP server), ``grpc.server`` or ``grpc.aio.server``,
and a child process running ``onnxserve serve`` or ``onnxserve demo`` (``python -m
onnxserve.serving.cli serve ...`` as ``ServerProcess.serve`` and ``onnxserve_command`` spell
it, or the ``onnxserve`` script). A test that needs a server belongs in tests/served/.

The guard wraps pytest's setup, call and teardown hooks rather than being an autouse fixture:
a function-scoped fixture is set up after the module- and session-scoped ones, so it would
miss a server fixture such as ``test_models_server``; this conftest's hooks run only for the
tests under this folder.
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import contextlib
import os
import shlex
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

#: the `onnxserve` subcommands that always start a server (`bench` starts one only for a
#: run, not for `--help` or settings it refuses: the modules that run it are in served/)
SERVER_COMMANDS = ("serve", "demo")


def _words(args: Any) -> list[str]:
    if isinstance(args, str | bytes | os.PathLike):
        return shlex.split(os.fsdecode(args))  # a shell=True string, or one program
    return [os.fsdecode(a) if isinstance(a, bytes | os.PathLike) else str(a) for a in args]


def starts_server(args: Any) -> bool:
    """Whether a command line runs one of the SERVER_COMMANDS of onnxserve."""
    words = _words(args)
    for i, word in enumerate(words):
        module = word == "onnxserve.serving.cli" and i > 0 and words[i - 1] == "-m"
        if module or os.path.basename(word) == "onnxserve":
            rest = [w for w in words[i + 1:] if not w.startswith("-")]
            return bool(rest) and rest[0] in SERVER_COMMANDS
    return False


@contextlib.contextmanager
def _no_servers(nodeid: str) -> Iterator[None]:
    def refuse(what: str) -> AssertionError:
        return AssertionError(f"{nodeid} started a server ({what}): unit tests start none; "
                              "move the test to tests/served/")

    def guarded_listen(self: socket.socket, *args: Any) -> None:
        raise refuse(f"a socket listening on {self.getsockname()!r}")

    def guarded_grpc_server(*args: Any, **kwargs: Any) -> Any:
        raise refuse("grpc.server")

    def guarded_aio_server(*args: Any, **kwargs: Any) -> Any:
        raise refuse("grpc.aio.server")

    popen_init = subprocess.Popen.__init__

    def guarded_popen_init(self: subprocess.Popen, *args: Any, **kwargs: Any) -> None:
        command = kwargs["args"] if "args" in kwargs else args[0]
        if starts_server(command):
            raise refuse(f"subprocess {_words(command)}")
        popen_init(self, *args, **kwargs)

    create_subprocess_exec = asyncio.create_subprocess_exec

    async def guarded_create_subprocess_exec(program: Any, *args: Any, **kwargs: Any) -> Any:
        if starts_server([program, *args]):
            raise refuse(f"asyncio subprocess {_words([program, *args])}")
        return await create_subprocess_exec(program, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "listen", guarded_listen)
        patch.setattr(grpc, "server", guarded_grpc_server)
        patch.setattr(grpc.aio, "server", guarded_aio_server)
        patch.setattr(subprocess.Popen, "__init__", guarded_popen_init)
        patch.setattr(asyncio, "create_subprocess_exec", guarded_create_subprocess_exec)
        patch.setattr(asyncio.subprocess, "create_subprocess_exec",
                      guarded_create_subprocess_exec)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    with _no_servers(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    with _no_servers(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    with _no_servers(item.nodeid):
        return (yield)
