"""Server processes started from Python: free ports, signals, start / wait / stop by PID.

One place for what `onnxserve demo`, the `--workers` supervisor, the benchmarks and the
tests each need when they run `onnxserve serve` as a child: the command line, a child that
dies with its parent, stop signals held until the child can take them (spawn), readiness,
and a stop that ends only the process it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from onnxserve.protos.naming import plain_int

#: The signals that stop `onnxserve serve` (and the supervisor of --workers N).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Linux prctl option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def onnxserve_command(*args: str) -> list[str]:
    """The argv that runs ``onnxserve ARGS`` with this interpreter (no console script needed)."""
    return [sys.executable, "-m", "onnxserve.serving.cli", *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers started locally)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Raise OSError when a server listens on ``host:port`` (or holds it bound), including
    one that set SO_REUSEPORT: the ``--workers N`` supervisor asks before its workers bind
    the port together, so that they never join another server's group on it.

    The test bind sets SO_REUSEADDR, as servers bind, so that closed connections still
    waiting out TIME_WAIT on the port do not count, and not SO_REUSEPORT, with which Linux
    would let it share a port another server listens on. It never listens.
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; elsewhere a
    no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


#: The variable through which spawn() asks a child to die with its parent: the parent's PID.
PARENT_PID_ENV = "ONNXSERVE_DIE_WITH_PARENT"


def die_with_parent_if_asked() -> None:
    """In a child spawn() started (first thing in its main): die_with_parent(), and exit
    at once if the parent died before that took effect. The variable is removed, so this
    process's own children are not affected."""
    parent = plain_int(os.environ.pop(PARENT_PID_ENV, ""), 2**31 - 1)
    if not parent:
        return
    die_with_parent()
    if os.getppid() != parent:
        os._exit(0)


def spawn(command: Sequence[str], *, hold_signals: bool, env: dict[str, str] | None = None,
          **popen: Any) -> subprocess.Popen:
    """Start ``command`` (an onnxserve process that calls die_with_parent_if_asked()) so
    that it dies with this process; with ``hold_signals``, SIGTERM/SIGINT blocked until the
    child has its handlers. ``env``: the child's whole environment (default this one's).

    A blocked signal stays pending across exec; `onnxserve serve` unblocks the two once
    its handler is installed (serving/workers.py, exit_on_stop_signals), so a stop sent at
    any moment, even before the interpreter has started, ends it with status 0 instead of
    killing it. Only for commands that unblock them: anything else would never see SIGTERM.

    No ``preexec_fn``: with one, Python forks (instead of vfork) and gRPC's fork handlers
    run in the child, whose poller then fails on the epoll descriptor that closing the
    inherited descriptors took away ("epoll_wait: Bad file descriptor", grpcio >= 1.80):
    the child dies before it runs, at random, whenever this process has gRPC channels or
    servers. So the signals are blocked in this thread around the start (the child
    inherits the mask) and the death signal is set by the child itself.
    """
    child_env = {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}
    if not hold_signals:
        return subprocess.Popen(list(command), env=child_env, **popen)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(list(command), env=child_env, **popen)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class ServerProcess:
    """A server process started here, its output in ``log_path`` (a temporary file when
    None), stopped by its own PID.

    ``command`` is the whole argv of an onnxserve process (see spawn); ``onnxserve serve``
    children (``serve=True``) start with their stop signals held, other servers only die
    with their parent.
    """

    def __init__(self, command: Sequence[str], url: str, log_path: Path | None = None,
                 *, serve: bool = True, env: dict[str, str] | None = None,
                 capture: bool = True, http_url: str | None = None,
                 drop_env: Sequence[str] = ()) -> None:
        self.url = url
        #: ``host:port`` of its HTTP/REST front end (None: off)
        self.http_url = http_url
        #: its Prometheus metrics port on 127.0.0.1 (0: off or not known)
        self.metrics_port = 0
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        if capture:
            self._log = log_path.open("w+b") if log_path else tempfile.TemporaryFile()
        self.process = spawn(
            command, hold_signals=serve, stdout=self._log,
            stderr=subprocess.STDOUT if capture else None,
            env={**{k: v for k, v in os.environ.items() if k not in drop_env},
                 "PYTHONUNBUFFERED": "1", **(env or {})})

    @classmethod
    def serve(cls, repository: Path, *flags: str, log_path: Path | None = None,
              port: int | None = None, metrics_port: int = 0, http_port: int | None = None,
              env: dict[str, str] | None = None, capture: bool = True,
              drop_env: Sequence[str] = ()) -> ServerProcess:
        """Start ``onnxserve serve`` on 127.0.0.1 (a free port unless ``port``) for
        ``repository``, with ``flags`` after the defaults (later flags win). HTTP on
        ``http_port`` (None: a free port; 0: off). With ``capture`` false its output goes
        to this process's stdout and stderr. ``drop_env``: variables of this process's
        environment it does not inherit (e.g. the ``ONNXSERVE_*`` settings)."""
        port = port or free_port()
        while http_port is None or http_port == port:
            http_port = free_port()
        command = onnxserve_command(
            "serve", "--model-repository", str(repository), "--grpc-host", "127.0.0.1",
            "--grpc-port", str(port), "--http-port", str(http_port),
            "--metrics-port", str(metrics_port), *flags)
        server = cls(command, f"127.0.0.1:{port}", log_path, env=env, capture=capture,
                     http_url=f"127.0.0.1:{http_port}" if http_port else None,
                     drop_env=drop_env)
        server.metrics_port = metrics_port
        return server

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr; "" when not captured)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        self._log.seek(0, os.SEEK_END)
        return text

    def wait_ready(self, timeout: float = 120.0, **client_arguments: Any) -> None:
        """Wait until the server reports ready (Client.wait_until_ready).

        Raises:
            RuntimeError: the process exited, a model failed to load, or ``timeout`` s
                passed; the message ends with the process's output. The process is stopped.
        """
        from onnxserve.clients.client import Client

        with Client(self.url, timeout=2.0, **client_arguments) as client:
            try:
                client.wait_until_ready(timeout, alive=lambda: self.running)
            except RuntimeError as exc:
                self.stop()
                raise RuntimeError(f"{exc}:\n{self.output()[-3000:]}") from None

    def wait_started(self, timeout: float = 60.0,
                     loaded: Callable[[], bool] | None = None) -> None:
        """Wait until the server has finished its start-up, whether every model loaded or
        not: its log says ``ready:`` and, when given, ``loaded()`` is true.

        Raises:
            RuntimeError: the process exited first, or ``timeout`` s passed (then it is
                stopped); the message holds its output.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n"
                                   f"{self.output()}")
            if "ready:" in self.output() and (loaded is None or loaded()):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not finish starting in {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
