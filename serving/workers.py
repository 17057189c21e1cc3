"""`onnxserve serve`'s processes: stop signals from the first moment, and `--workers N`.

**Stop signals.** exit_on_stop_signals() is the first thing `onnxserve serve` does
(cli.main, before the heavy imports): until the server installs its own handlers (at the
start of server.serve), SIGTERM or SIGINT ends the process at once with status 0, as
nothing has been opened or loaded yet; Python's default would kill it by the signal (exit
status 143 in a shell; the --workers parent used to turn a worker's -15 into 241). A
supervisor can close even the gap before the interpreter runs any code by starting the
server with the two signals blocked (process.spawn, which `onnxserve demo`
and the tests use; this module's parent blocks them across each worker's spawn): a signal
sent then stays pending until exit_on_stop_signals unblocks it.

**Workers.** ``--workers N`` runs N server processes sharing one port (SO_REUSEPORT). Each
is a full server with its own models and schedulers; the kernel spreads incoming
connections across them. Only they share it: a server started alone binds without
SO_REUSEPORT, and the parent first checks that no server listens on the gRPC and HTTP
ports (with SO_REUSEPORT or not), else exits 2 with the same line a single server prints,
so that a second server never joins the first one's group and answers half its
connections. (Two supervisors started within the same moment both pass that check: nothing
in the kernel tells one supervisor's workers from another's.)
Each worker is a fresh interpreter handed the parent's ServerSettings object itself
(pickled on its stdin), with its share of the cores and its own metrics port: nothing is
rebuilt as command-line flags, so nothing can be lost on the way.
(Not multiprocessing's spawn: it clears the signal mask, so a stop sent to a worker before
its handler exists would kill it instead of waiting for the handler.)
It helps models bound by per-request Python overhead, and only for clients that open
several connections: one HTTP/2 connection always lands on one worker.

**Supervision.** The parent forwards SIGTERM/SIGINT to the workers and exits 0 once they
have all exited 0 after it (else with the worst status, 128 + n for a worker killed by
signal n). It learns that a worker is ready (its initial models loaded) through a pipe the
worker writes to, and it notices a worker's exit at once (the pipe's end) and logs it with
its pid and status. Then:

- a worker that exits before it was ever ready failed at start-up (a port taken, a file it
  cannot read, ...): restarting cannot fix that, so the parent stops the other workers and
  exits with that worker's status (1 if it was 0);
- a worker that exits while serving (the OOM killer, a crash in native code, an operator's
  kill) is restarted, after 1 s, then 2, 4, ... up to 30 s, as long as fewer than
  RESTART_LIMIT workers exited within RESTART_WINDOW_S. The other workers keep serving
  meanwhile, and a restart takes seconds (loading the models), where stopping the whole
  server would drop every worker's connections and leave the replica down until the
  orchestrator restarts it. A worker that dies again and again is not a one-off, though:
  at the limit the parent stops the others and exits 1, so that the orchestrator sees the
  failure (and restarts the container, with its own back-off and alerts).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from onnxserve.serving.observability.logs import configure as configure_logs
from onnxserve.serving.process import (
    STOP_SIGNALS,
    check_port_free,
    die_with_parent_if_asked,
    spawn,
)
from onnxserve.serving.settings import ServerSettings, port_unavailable

log = logging.getLogger(__name__)

#: Worker exits while serving, within RESTART_WINDOW_S, at which the parent gives up.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 600.0
#: Seconds before restarting a worker: doubled for each recent exit, up to the maximum.
FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
#: What a worker writes to its readiness pipe once its initial models are loaded.
READY_MESSAGE = b"ready\n"


def _exit_at_once(signum: int, _frame: object) -> None:
    os.write(2, f"onnxserve serve: {signal.Signals(signum).name} before start-up finished: "
                "exiting\n".encode())
    os._exit(0)


def exit_on_stop_signals() -> None:
    """From now until the server installs its own handlers, SIGTERM/SIGINT exit 0 at once.

    Also unblocks the two signals, which a supervisor may have blocked
    (process.spawn) so that a signal sent before this point waits for this handler
    instead of killing the process. Call from the main thread.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_at_once)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def shell_status(returncode: int) -> int:
    """A Popen return code as a process exit status: n, or 128 + s when killed by signal s."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """``exited with status 2`` or ``was killed by SIGKILL``."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    #: read end of the worker's readiness pipe; None once the worker closed it (exited)
    pipe: int | None
    ready: bool = False


def _loop_factory(settings: ServerSettings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop --event-loop names (None: asyncio's default)."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_server(settings: ServerSettings, *, on_ready: Callable[[], None] | None = None,
               process_name: str | None = None, share_ports: bool = False) -> int:
    """Run one server in this process until it is stopped; returns the exit status.

    ``process_name`` ("worker 1") goes into every log line; ``on_ready`` is called once
    the models meant to load at start have loaded; ``share_ports``: a worker of
    ``--workers N``, which shares the gRPC and HTTP ports with its siblings (SO_REUSEPORT).
    """
    from .frontends.auth import AuthError
    from .server import StartupError, serve

    configure_logs(settings.log_level, settings.log_format, process_name)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings)) as runner:
            runner.run(serve(settings, on_ready=on_ready, share_ports=share_ports))
    except (AuthError, StartupError) as exc:
        print(f"onnxserve serve: {exc}", file=sys.stderr)
        return 2
    finally:
        exit_on_stop_signals()  # the runner put Python's default handlers back
    return 0


def worker_main() -> None:
    """A worker process's whole life: ``python -c "...worker_main()" READY_FD``, its
    ServerSettings and index pickled on stdin (from the parent, never from a user)."""
    die_with_parent_if_asked()
    exit_on_stop_signals()  # and unblock the stop signals the parent held for us
    ready_fd = int(sys.argv[1])
    settings, index = pickle.loads(sys.stdin.buffer.read())  # from our parent only

    def notify() -> None:
        with contextlib.suppress(OSError):  # parent gone: its death signal stops us anyway
            os.write(ready_fd, READY_MESSAGE)

    sys.exit(run_server(settings, on_ready=notify, process_name=f"worker {index}",
                        share_ports=True))


#: the command a worker runs, with its readiness pipe's fd appended
WORKER_COMMAND = [sys.executable, "-c",
                  "from onnxserve.serving.workers import worker_main; worker_main()"]


class _Supervisor:
    """Starts the workers, restarts or gives up on the ones that exit, forwards stops."""

    def __init__(self, settings: ServerSettings, command: list[str] | None = None) -> None:
        """``command`` runs a worker (default: WORKER_COMMAND); it gets its readiness fd
        as its last argument and ``(settings, index)`` pickled on stdin."""
        self._settings = settings
        self._command = command or WORKER_COMMAND
        self._count = settings.workers
        self._metrics_port = settings.metrics_port
        #: each worker's share of the cores
        self.cores = max(1, (settings.cores or os.cpu_count() or 1) // settings.workers)
        self._workers: dict[int, _Worker] = {}
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        #: worker index -> time.monotonic() at which to start it again
        self._restarts: dict[int, float] = {}
        self._exits: collections.deque[float] = collections.deque()
        self._stopping = False
        #: exit status once the supervisor gave up (a start-up failure, too many exits)
        self._failure: int | None = None
        #: statuses of the workers that exited after the stop began
        self._final: list[int] = []

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)  # acted on in the loop (the wake-up fd ends its wait)

    def run(self) -> int:
        """Supervise until every worker has exited; returns the command's exit status."""
        wake_read, wake_write = os.pipe()
        for fd in (wake_read, wake_write):
            os.set_blocking(fd, False)
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self._selector.register(wake_read, selectors.EVENT_READ, None)
        try:
            for index in range(self._count):
                if self._failure is None and not self._signals:
                    self._start(index)
            return self._supervise(wake_read)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            self._selector.close()
            for fd in (wake_read, wake_write):
                os.close(fd)

    def _start(self, index: int) -> None:
        port = self._metrics_port + index if self._metrics_port else 0
        settings = dataclasses.replace(self._settings, workers=1, cores=self.cores,
                                       metrics_port=port)
        read_end, write_end = os.pipe()
        try:
            # Stop signals held (and death with the parent): a stop sent before the
            # worker has its handler waits for it (see process.spawn).
            process = spawn([*self._command, str(write_end)], hold_signals=True,
                            stdin=subprocess.PIPE, pass_fds=(write_end,))
        except OSError as exc:
            os.close(read_end)
            log.error("cannot start worker %d: %s; stopping the other workers", index, exc)
            self._give_up(1)
            return
        finally:
            os.close(write_end)
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died at once: reaped below
            process.stdin.write(pickle.dumps((settings, index)))
        process.stdin.close()
        os.set_blocking(read_end, False)
        worker = _Worker(index, process, read_end)
        self._workers[index] = worker
        self._selector.register(read_end, selectors.EVENT_READ, worker)
        log.info("worker %d started (pid %d%s)", index, process.pid,
                 f", metrics port {port}" if port else "")

    def _signal_workers(self, signum: int) -> None:
        for worker in self._workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _give_up(self, status: int) -> None:
        if self._failure is None:
            self._failure = status
        self._restarts.clear()
        self._signal_workers(signal.SIGTERM)

    def _timeout(self) -> float:
        if any(w.pipe is None for w in self._workers.values()):
            return 0.02  # a worker closed its pipe: it is exiting, reap it soon
        timeout = 0.5
        if self._restarts:
            timeout = min(timeout, max(0.0, min(self._restarts.values()) - time.monotonic()))
        return timeout

    def _supervise(self, wake_read: int) -> int:
        while self._workers or self._restarts:
            for key, _events in self._selector.select(self._timeout()):
                if key.data is None:
                    while True:  # empty the wake-up pipe (signal numbers, one byte each)
                        try:
                            if not os.read(wake_read, 512):
                                break
                        except BlockingIOError:
                            break
                else:
                    self._read_pipe(key.data)
            while self._signals:
                signum = self._signals.pop(0)
                if not self._stopping:
                    log.info("%s: stopping %d worker(s)", signal.Signals(signum).name,
                             len(self._workers))
                self._stopping = True
                self._restarts.clear()
                self._signal_workers(signum)
            for worker in list(self._workers.values()):
                if worker.process.poll() is not None:
                    self._exited(worker)
            now = time.monotonic()
            for index, when in list(self._restarts.items()):
                if when <= now and not self._stopping and self._failure is None:
                    del self._restarts[index]
                    self._start(index)
        if self._failure is not None:
            return self._failure
        status = max((shell_status(code) for code in self._final), default=0)
        log.info("all workers stopped%s", "" if status == 0 else f" (worst status {status})")
        return status

    def _read_pipe(self, worker: _Worker) -> None:
        assert worker.pipe is not None
        try:
            data = os.read(worker.pipe, 64)
        except BlockingIOError:
            return
        if data:
            if READY_MESSAGE in data and not worker.ready:
                worker.ready = True
                log.info("worker %d ready (pid %d)", worker.index, worker.process.pid)
            return
        self._close_pipe(worker)

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.pipe is not None:
            self._selector.unregister(worker.pipe)
            os.close(worker.pipe)
            worker.pipe = None

    def _exited(self, worker: _Worker) -> None:
        if worker.pipe is not None:  # its last words may still be in the pipe
            self._read_pipe(worker)
            self._close_pipe(worker)
        del self._workers[worker.index]
        code = worker.process.returncode
        what = f"worker {worker.index} (pid {worker.process.pid}) {describe_exit(code)}"
        if self._stopping or self._failure is not None:
            self._final.append(code)
            log.log(logging.INFO if code == 0 else logging.WARNING, "%s", what)
            return
        if not worker.ready:
            port = self._metrics_port + worker.index if self._metrics_port else 0
            log.error("%s before it was ready: it failed at start-up (its error is above%s); "
                      "stopping the other workers", what,
                      f"; its metrics port is {port}" if port else "")
            self._give_up(shell_status(code) or 1)
            return
        now = time.monotonic()
        self._exits.append(now)
        while self._exits and self._exits[0] < now - RESTART_WINDOW_S:
            self._exits.popleft()
        if len(self._exits) >= RESTART_LIMIT:
            log.error("%s while serving: %d worker exits within %.0f s are not a one-off; "
                      "stopping the server (exit status 1) so that its supervisor sees the "
                      "failure", what, len(self._exits), RESTART_WINDOW_S)
            self._give_up(1)
            return
        delay = min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** (len(self._exits) - 1))
        log.error("%s while serving; restarting it in %.0f s", what, delay)
        self._restarts[worker.index] = now + delay


def run_workers(settings: ServerSettings) -> int:
    """Run ``settings.workers`` servers until stopped; returns the exit status.

    Each worker gets its share of ``settings.cores`` (0: the machine's) for its sessions'
    threads, and worker k serves its metrics on ``metrics_port + k`` (0: none). Returns 0
    when stopped by SIGTERM/SIGINT and every worker exited 0; see the module docstring for
    the other statuses.
    """
    configure_logs(settings.log_level, settings.log_format, "supervisor")
    for name in ("grpc_port", "http_port"):  # the ports the workers share (SO_REUSEPORT)
        if getattr(settings, name):
            try:
                check_port_free(settings.grpc_host, getattr(settings, name))
            except OSError as exc:
                print(f"onnxserve serve: {port_unavailable(settings, name, exc)}",
                      file=sys.stderr)
                return 2
    supervisor = _Supervisor(settings)
    log.info("starting %d workers, %d core(s) each", settings.workers, supervisor.cores)
    return supervisor.run()
