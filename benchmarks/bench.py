"""`onnxserve bench`: served throughput and latency against raw onnxruntime and a null server.

    onnxserve bench --model-repository DIR --models lenet5 mobilenet_v2

For each model: raw onnxruntime in-process (batch 1 and larger), a do-nothing gRPC
server with the same client (the transport's ceiling), then onnxserve with dynamic
batching on and off and 1 or more worker processes, each at every concurrency (closed
loop) or request rate (open loop). Reports inferences/s, p50/p90/p95/p99, errors, client
and server CPU, and the server's own queue/compute split from ModelStatistics. Writes
bench.json, bench.md and bench.png (with matplotlib) to --out (default ./bench_results;
``make bench`` passes benchmarks/results, the committed results).

``--client perf_analyzer`` measures each configuration with Triton's C++ load generator
instead (benchmarks/perf_analyzer.py, fetched on first use), ``--client both`` with the
Python client and then perf_analyzer; perf_analyzer's figures leave out the Python
client's CPU, and every row names its ``client``. perf_analyzer measures once per
``--pa-protocol`` (grpc, http) and ``--pa-mode`` (plain, streaming, shared-memory), each
combination its own row (``pa_protocol``, ``pa_mode``; streaming is gRPC's only).

``--grpc-transport native python`` measures each onnxserve set-up once per gRPC transport
(``onnxserve serve --grpc-transport``), each row naming its ``grpc_transport``; without it
the server runs with its own default. ``--cpp-null PATH`` also measures a do-nothing KServe
V2 server written in C++ (rows ``null (C++)``, JSON ``null_cpp_server``), with the same
clients and loads as the Python null server, and adds a "vs C++ null" column.

Each configuration (server x load) warms up for --warmup s and measures 3 to --max-windows
windows of --window s: 11-20 s with the defaults, 20 configurations per model, so about
8-14 minutes for the two default models; the run prints [n/total] before each one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.export.cpu import this_cpu
from onnxserve.protos.datatypes import by_config_type
from onnxserve.serving.models.repository import read_model
from onnxserve.serving.process import ServerProcess, free_port

from .load import build_request, run_load
from .perf_analyzer import (
    ENV_VAR,
    PerfAnalyzer,
    PerfAnalyzerFailed,
    PerfAnalyzerMissing,
    Transport,
    find_perf_analyzer,
    run_perf_analyzer,
)
from .perf_analyzer import MIN_WINDOWS as PA_MIN_WINDOWS
from .perf_analyzer import MODES as PA_MODES
from .perf_analyzer import PROTOCOLS as PA_PROTOCOLS
from .raw_onnxruntime import raw_onnxruntime

#: Where results go by default: a folder in the working directory, never the package's own
#: benchmarks/results (the committed results, which ``make bench`` writes with --out).
DEFAULT_OUT = Path("bench_results")
#: Batch sizes of the raw onnxruntime reference, each run for --window seconds.
RAW_BATCH_SIZES = (1, 8, 32)
#: Windows a configuration measures at least (load.run_load stops when three agree).
MIN_WINDOWS = 3
#: --client choices -> the load generators they run, in the order they run.
CLIENTS = {"python": ("python",), "perf_analyzer": ("perf_analyzer",),
           "both": ("python", "perf_analyzer")}
#: --grpc-transport choices: onnxserve serve's, less ``auto`` (a row names what served it).
GRPC_TRANSPORTS = ("native", "python")
#: Threads the C++ null server of --cpp-null serves with (its --threads).
CPP_NULL_THREADS = 2
#: Seconds the C++ null server has to answer ServerReady after it starts.
CPP_NULL_START_S = 30.0
_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its child processes."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        this, parent = int(stat.parent.name), int(fields[1])
        if this == pid or parent == pid:
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def _sample(config) -> np.ndarray:
    (tensor,) = config.input
    dims = list(tensor.dims)
    rng = np.random.default_rng(0)
    if tensor.data_type == 2:  # TYPE_UINT8
        return rng.integers(0, 256, dims, dtype=np.uint8)
    return rng.random(dims, dtype=np.float32)


def _variant_repository(source: Path, name: str, target: Path, batching: bool) -> None:
    """A repository holding ``name`` with dynamic batching switched on or off."""
    folder = target / name
    shutil.copytree(source / name, folder, symlinks=True)
    config = read_model(target, name).config
    if not batching:
        config.ClearField("dynamic_batching")
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


class Progress:
    """Numbers the configurations as they run: ``[3/40] ...`` with the time left, estimated
    from the configurations done so far."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.skipped = 0
        self.started = time.monotonic()

    def skip(self, count: int) -> None:
        """``count`` announced configurations will not run: they count as done (the total
        stays, so the numbers only go up) and take no time in the estimate."""
        self.done += count
        self.skipped += count

    def next(self, what: str) -> None:
        """Print the line announcing the next configuration, ``what`` it measures."""
        left = ""
        ran = self.done - self.skipped
        if ran:
            per = (time.monotonic() - self.started) / ran
            left = f" (about {_duration(per * (self.total - self.done))} left)"
        self.done += 1
        print(f"[{self.done}/{self.total}] {what}{left}", flush=True)


def _duration(seconds: float) -> str:
    """``4.5 s``, ``45 s`` or ``7 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _duration_range(low: float, high: float) -> str:
    """``11-20 s`` or ``8-14 min`` (both ends in the unit ``high`` needs), or one figure
    where both ends round to it."""
    if high < 10:
        ends, unit = (f"{low:.1f}", f"{high:.1f}"), "s"
    elif high < 90:
        ends, unit = (f"{low:.0f}", f"{high:.0f}"), "s"
    else:
        ends, unit = (f"{low / 60:.0f}", f"{high / 60:.0f}"), "min"
    return f"{ends[1]} {unit}" if ends[0] == ends[1] else f"{ends[0]}-{ends[1]} {unit}"


def _load_label(mode: str, concurrency: int, rate: float | None) -> str:
    return f"concurrency {concurrency}" if mode == "closed" else f"Poisson {rate:g} requests/s"


def _loads(args) -> list[tuple[str, int, float | None]]:
    """(mode, concurrency, rate) of each load a server is measured at."""
    return ([("closed", c, None) for c in args.concurrency]
            + [("poisson", 0, r) for r in args.rate])


def _clients(args) -> tuple[str, ...]:
    """The load generators --client names, in the order each configuration runs them."""
    return CLIENTS[getattr(args, "client", "python")]


def _transports(args) -> list[Transport]:
    """The perf_analyzer transports of --pa-protocol x --pa-mode, in that order; streaming
    only over gRPC (perf_analyzer streams over gRPC only)."""
    protocols = getattr(args, "pa_protocol", None) or ["grpc"]
    modes = getattr(args, "pa_mode", None) or ["plain"]
    return [Transport(p, m) for p in dict.fromkeys(protocols) for m in dict.fromkeys(modes)
            if not (m == "streaming" and p != "grpc")]


def _runs(args) -> list[tuple[str, Transport | None]]:
    """The measurements of each configuration, in order: (client, perf_analyzer's
    transport, None for the Python client)."""
    runs: list[tuple[str, Transport | None]] = []
    for client in _clients(args):
        if client == "python":
            runs.append((client, None))
        else:
            runs += [(client, transport) for transport in _transports(args)]
    return runs


def _grpc_transports(args) -> list[str | None]:
    """The gRPC transports each onnxserve set-up is measured with, in the order of
    --grpc-transport; [None] (the server's own default, no flag passed) without it."""
    return list(dict.fromkeys(getattr(args, "grpc_transport", None) or [None]))


def server_label(row: dict) -> str:
    """An onnxserve row's server as the table names it: ``onnxserve``, or with the gRPC
    transport it was started with, ``onnxserve (native)``."""
    transport = row.get("grpc_transport")
    return "onnxserve" if transport is None else f"onnxserve ({transport})"


def client_label(row: dict) -> str:
    """A row's client as the table names it: ``python``, or ``perf_analyzer`` with its
    protocol and mode (``perf_analyzer (http shared-memory)``); rows written before
    perf_analyzer had transports say ``perf_analyzer``."""
    client = row.get("client", "python")
    if client == "python" or "pa_protocol" not in row:
        return client
    return f"{client} ({Transport(row['pa_protocol'], row.get('pa_mode', 'plain')).label})"


def configurations_per_model(args) -> int:
    """Loads measured per model: on the null server (and its parsing variant with
    --null-parse, and the C++ one with --cpp-null) and on each onnxserve set-up (workers x
    batching x gRPC transport; each measured once per client of --client)."""
    nulls = (1 + bool(getattr(args, "null_parse", False))
             + (getattr(args, "cpp_null", None) is not None))
    setups = len(args.workers) * len(args.batching) * len(_grpc_transports(args))
    return (nulls + setups) * len(_loads(args))


def measurements_per_model(args) -> int:
    """Measurements per model: configurations_per_model() x the clients of --client (and
    perf_analyzer once per transport)."""
    return configurations_per_model(args) * len(_runs(args))


def expected_seconds(args, models: int) -> tuple[float, float]:
    """Least and most seconds the measurements of ``models`` models take: each
    configuration warms up, then measures 3 (MIN_WINDOWS) to --max-windows windows, and
    again with perf_analyzer, once per transport, when --client asks for it
    (client_seconds); raw onnxruntime
    runs each of RAW_BATCH_SIZES for one window. Server start-ups (a few seconds each) are
    not included."""
    configurations = models * configurations_per_model(args)
    raw = models * len(RAW_BATCH_SIZES) * args.window
    spans = [client_seconds(args, client) for client, _ in _runs(args)]
    return (configurations * sum(low for low, _ in spans) + raw,
            configurations * sum(high for _, high in spans) + raw)


def configuration_seconds(args) -> tuple[float, float]:
    """Least and most seconds one configuration's measurement by the Python client takes
    (see expected_seconds)."""
    return (args.warmup + min(MIN_WINDOWS, args.max_windows) * args.window,
            args.warmup + args.max_windows * args.window)


def client_seconds(args, client: str) -> tuple[float, float]:
    """Least and most seconds one configuration's measurement by ``client`` takes.
    perf_analyzer has no warm-up; it measures 3 to max(3, --max-windows) windows, and when
    they never agree, 3 more (perf_analyzer.run_perf_analyzer)."""
    if client == "python":
        return configuration_seconds(args)
    most = max(PA_MIN_WINDOWS, args.max_windows)
    return PA_MIN_WINDOWS * args.window, (most + PA_MIN_WINDOWS) * args.window


@dataclass
class Measured:
    """What _measure() got from one server: ``rows`` (one per load and client) and
    ``not_measured`` (each load perf_analyzer could not measure, with the reason)."""

    rows: list[dict] = field(default_factory=list)
    not_measured: list[dict] = field(default_factory=list)


def _measure(url, payload, samples, args, pid, progress: Progress, what: str,
             stats_name=None, *, model: str = "", pa_inputs: dict | None = None,
             analyzer: PerfAnalyzer | None = None, optional: bool = False,
             http_url: str | None = None,
             refusal: Callable[[Transport], str | None] | None = None) -> Measured:
    """Measure the server at ``url`` (gRPC; ``http_url``: its HTTP port, process ``pid``)
    at each load with each client of --client, perf_analyzer once per transport. A load
    perf_analyzer fails at goes to ``not_measured``; so does every load of a transport
    ``refusal`` gives a reason for (not run, marked ``skipped``), and with ``optional`` (a
    server perf_analyzer may not be able to talk to, the null server) a transport's first
    failure skips its other loads too."""
    measured = Measured()
    #: transport label -> why perf_analyzer does not measure it on this server
    given_up: dict[str, str] = {}
    for mode, concurrency, rate in _loads(args):
        for client, transport in _runs(args):
            item: dict = {"client": client, "mode": mode, "concurrency": concurrency,
                          "rate": rate}
            if transport is not None:
                item.update(pa_protocol=transport.protocol, pa_mode=transport.mode)
                reason = given_up.get(transport.label) or (
                    refusal(transport) if refusal is not None else None)
                if reason is not None:
                    progress.skip(1)
                    if transport.label not in given_up:
                        print(f"  perf_analyzer ({transport.label}) does not measure {what}: "
                              f"{reason}", flush=True)
                        given_up[transport.label] = reason
                    measured.not_measured.append({**item, "reason": reason, "skipped": True})
                    continue
            label = _load_label(mode, concurrency, rate)
            progress.next(f"{what}, {label}" + (
                "" if transport is None else f", perf_analyzer ({transport.label})"))
            before = _stats(url, stats_name)
            cpu0, t0 = tree_cpu_seconds(pid), time.perf_counter()
            if transport is None:
                result = asyncio.run(run_load(
                    url, payload, samples_per_request=samples, concurrency=concurrency or 1,
                    rate=rate, warmup_s=args.warmup, window_s=args.window,
                    max_windows=args.max_windows,
                )).as_dict()
            else:
                assert analyzer is not None, "--client perf_analyzer without a perf_analyzer"
                target = url if transport.protocol == "grpc" else http_url
                assert target is not None, f"no {transport.protocol} address for {what}"
                try:
                    result = run_perf_analyzer(
                        analyzer, target, model, concurrency=concurrency or 1, rate=rate,
                        batch_size=samples, inputs=pa_inputs, window_s=args.window,
                        max_windows=args.max_windows, transport=transport).as_dict()
                except PerfAnalyzerFailed as exc:
                    measured.not_measured.append({**item, "reason": str(exc)})
                    if optional:
                        given_up[transport.label] = str(exc)
                        print(f"  perf_analyzer cannot measure {what}: {exc}; skipping "
                              f"{transport.label} there", flush=True)
                    else:
                        print(f"  perf_analyzer failed: {exc}", flush=True)
                    continue
            server_cpu = 100 * (tree_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
            measured.rows.append(_row(result, client, server_cpu, before,
                                      _stats(url, stats_name)))
    return measured


def _null_refusal(transport: Transport) -> str | None:
    """Why perf_analyzer cannot measure the null server over ``transport``: it answers
    unary gRPC inference only."""
    if transport == Transport():
        return None
    return ("the null server answers unary gRPC inference only (no HTTP, streaming or "
            "shared memory)")


def _workers_refusal(workers: int) -> Callable[[Transport], str | None]:
    """Why perf_analyzer cannot measure onnxserve with ``workers`` processes over a
    transport (None: it can). Each worker has its own shared memory regions and its own
    statistics, while the kernel spreads connections across the workers: shared memory
    needs the connection that registered a region, and perf_analyzer's statistics calls
    over HTTP reach different workers, so the counts it subtracts come from different
    processes and it stops ("failed to find the requested model version", seen with 2
    workers)."""

    def refusal(transport: Transport) -> str | None:
        if workers == 1:
            return None
        if transport.mode == "shared-memory":
            return (f"shared memory regions belong to one server process, and with "
                    f"{workers} workers perf_analyzer's connections land on different ones "
                    "(measure shared memory with --workers 1)")
        if transport.protocol == "http":
            return (f"perf_analyzer's statistics calls over HTTP reach any of the {workers} "
                    "workers, each with its own statistics, and it stops when their counts "
                    "disagree (measure HTTP with --workers 1)")
        return None

    return refusal


def start_cpp_null(binary: Path) -> ServerProcess:
    """Start the C++ null server ``binary`` (--cpp-null) on a free port of 127.0.0.1 with
    CPP_NULL_THREADS threads, as the Python null server is started (stop signals not held:
    it takes SIGTERM from the start). Unlike the Python servers it cannot ask to die with
    this process (process.die_with_parent_if_asked), so where util-linux's ``setpriv`` is
    found it starts through ``setpriv --pdeathsig TERM``, which asks that for it and then
    runs it in its own place (same PID)."""
    port = free_port()
    command = [str(binary.absolute()), "--port", str(port), "--threads",
               str(CPP_NULL_THREADS), "--host", "127.0.0.1"]
    setpriv = shutil.which("setpriv")
    if setpriv:
        command = [setpriv, "--pdeathsig", "TERM", "--", *command]
    return ServerProcess(command, f"127.0.0.1:{port}", serve=False)


def _tensors(tensors: list[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"`{n}` {t} {s}" for n, t, s in tensors) or "no input"


def cpp_null_fit(name: str, config, answer) -> tuple[str | None, str | None]:
    """Whether the C++ null server measures model ``name`` (its ``config``), judged from
    ``answer``, the server's ModelMetadata for that name (clients.client.ModelMetadata, or
    the InferenceServerError it answered): (why it measures nothing of the model, why
    perf_analyzer does not measure it), None where it does.

    It serves models of its own (by name, not the repository's) and answers any inference
    request for one of them, whatever its inputs, so the Python client, which sends the
    model's own pre-serialised request, measures it whenever it serves the name.
    perf_analyzer builds its requests from the server's metadata: where that declares an
    input named, typed or shaped otherwise than the model's, it would send other data (or
    stop), so it is not run there."""
    if isinstance(answer, InferenceServerError):
        return f"it does not serve {name} ({answer})", None
    if answer.name != name:
        return f"it does not serve {name} (its ModelMetadata names {answer.name!r})", None
    want = [(t.name, by_config_type(t.data_type).name,
             ([-1] if config.max_batch_size > 0 else []) + list(t.dims)) for t in config.input]
    got = [(t.name, t.datatype, list(t.shape)) for t in answer.inputs]
    if got != want:
        return None, (f"its {name} takes {_tensors(got)} where the model takes "
                      f"{_tensors(want)}, so perf_analyzer, which sends what the server's "
                      "metadata declares, would send other data (the Python client sends "
                      "the model's own request, which it answers whatever its inputs)")
    return None, None


def _row(result: dict, client: str, server_cpu: float, before: dict | None,
         after: dict | None) -> dict:
    """A result's row: the client's figures, the server's CPU % and, from the
    ModelStatistics ``before`` and ``after`` the load, its queue/compute ms and mean
    batch."""
    row = {**result, "client": client, "server_cpu_percent": round(server_cpu, 1)}
    if before and after:
        n = after["success"]["count"] - before["success"]["count"]
        execs = after["execution_count"] - before["execution_count"]
        if n:
            row["server_queue_ms"] = (after["queue"]["ns"] - before["queue"]["ns"]) / n / 1e6
            row["server_compute_ms"] = (after["compute_infer"]["ns"]
                                        - before["compute_infer"]["ns"]) / n / 1e6
            row["mean_batch"] = (after["inference_count"] - before["inference_count"]) / max(
                execs, 1)
    print(f"  {row['throughput']:.0f}/s p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} "
          f"ms errors {row['errors']} client cpu {row['client_cpu_percent']:.0f}% server "
          f"cpu {server_cpu:.0f}%" + ("" if row["stable"] else " (unstable)"), flush=True)
    return row


def _stats(url: str, name: str | None) -> dict | None:
    if name is None:
        return None
    with Client(url) as client:
        return client.statistics(name)[0]


def bench_model(repository: Path, name: str, args, progress: Progress,
                analyzer: PerfAnalyzer | None = None) -> dict:
    """Measure model ``name``: raw onnxruntime, the null server (then its parsing variant
    with --null-parse and the C++ one with --cpp-null), then onnxserve with each --workers,
    --batching and --grpc-transport at each load, with each client of --client
    (``analyzer`` runs the perf_analyzer ones); ``progress`` numbers the configurations.

    The result's ``perf_analyzer_not_measured`` lists each load perf_analyzer failed at
    or did not try (``skipped``), with the server (``null``, ``null (C++)`` or
    ``onnxserve`` with its workers, batching and ``grpc_transport``), the transport
    (``pa_protocol``, ``pa_mode``) and the reason. With --cpp-null, ``null_cpp_server``
    holds the C++ null server's rows, and ``null_cpp_not_measured`` why it measured none
    when it does not serve the model (cpp_null_fit)."""
    config = read_model(repository, name).config
    sample = _sample(config)
    batch = np.repeat(sample[np.newaxis], args.samples_per_request, axis=0)
    payload = build_request(name, {config.input[0].name: batch})
    # perf_analyzer sends the same sample, repeated --samples-per-request times (-b).
    pa_inputs = {config.input[0].name: sample}
    model_file = next(iter(sorted((repository / name).glob("*/model.onnx"))))
    print(f"{name}: raw onnxruntime, batch {', '.join(map(str, RAW_BATCH_SIZES))} "
          f"({args.window:g} s each)", flush=True)
    raw = raw_onnxruntime(model_file, sample, batch_sizes=RAW_BATCH_SIZES, seconds=args.window)
    for b, r in raw.items():
        print(f"  batch {b}: {r['throughput']:.0f}/s p50 {r['p50_ms']:.3f} ms", flush=True)
    out: dict = {"model": name, "samples_per_request": args.samples_per_request,
                 "raw_onnxruntime": raw, "null_server": [], "onnxserve": []}
    if "perf_analyzer" in _clients(args):
        out["perf_analyzer_not_measured"] = []
    measure = {"model": name, "pa_inputs": pa_inputs, "analyzer": analyzer}
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.pbtxt"
        config_file.write_text(text_format.MessageToString(config))
        for key, parse in (("null_server", False), ("null_parse_server", True)):
            if parse and not args.null_parse:
                continue
            port = free_port()
            null = ServerProcess([sys.executable, "-m", "onnxserve.benchmarks.null_server",
                                  "--port", str(port), "--model-config", str(config_file),
                                  *(["--parse"] if parse else [])],
                                 f"127.0.0.1:{port}", serve=False)
            what = f"{name} null server" + (" (parse)" if parse else "")
            try:
                null.wait_ready()
                measured = _measure(null.url, payload, args.samples_per_request, args,
                                    null.pid, progress, what, optional=True,
                                    refusal=_null_refusal, **measure)
            finally:
                null.stop()
            out[key] = measured.rows
            for item in measured.not_measured:
                out["perf_analyzer_not_measured"].append(
                    {"server": "null (parse)" if parse else "null", **item})
    cpp_null = getattr(args, "cpp_null", None)
    if cpp_null is not None:
        out["null_cpp_server"] = []
        null = start_cpp_null(cpp_null)
        try:
            null.wait_ready(CPP_NULL_START_S)
            try:
                with Client(null.url, timeout=10.0) as client:
                    answer = client.model_metadata(name)
            except InferenceServerError as exc:
                answer = exc
            refused, pa_reason = cpp_null_fit(name, config, answer)
            if refused is not None:
                progress.skip(len(_loads(args)) * len(_runs(args)))
                print(f"  the C++ null server measures nothing of {name}: {refused}",
                      flush=True)
                out["null_cpp_not_measured"] = refused
            else:
                measured = _measure(
                    null.url, payload, args.samples_per_request, args, null.pid, progress,
                    f"{name} null server (C++)", optional=True,
                    refusal=lambda t: _null_refusal(t) or pa_reason, **measure)
                out["null_cpp_server"] = measured.rows
                for item in measured.not_measured:
                    out["perf_analyzer_not_measured"].append({"server": "null (C++)", **item})
        finally:
            null.stop()
    for workers in args.workers:
        for batching in args.batching:
            for grpc_transport in _grpc_transports(args):
                _measure_onnxserve(repository, name, args, progress, out, workers, batching,
                                   grpc_transport, payload, measure)
    return out


def _measure_onnxserve(repository: Path, name: str, args, progress: Progress, out: dict,
                       workers: int, batching: str, grpc_transport: str | None,
                       payload: bytes, measure: dict) -> None:
    """Measure onnxserve serving ``name`` with ``workers`` processes, dynamic batching on or
    off and ``grpc_transport`` (None: the server's default) into ``out`` (bench_model's)."""
    transport = {} if grpc_transport is None else {"grpc_transport": grpc_transport}
    with tempfile.TemporaryDirectory() as tmp:
        _variant_repository(repository, name, Path(tmp), batching == "on")
        flags = [] if grpc_transport is None else ["--grpc-transport", grpc_transport]
        server = ServerProcess.serve(Path(tmp), "--workers", str(workers),
                                     "--log-level", "WARNING", *flags)
        what = (f"{name} {server_label(transport)}, batching {batching}, {workers} "
                f"worker{'s' if workers > 1 else ''}")
        try:
            server.wait_ready()
            measured = _measure(server.url, payload, args.samples_per_request, args,
                                server.pid, progress, what,
                                stats_name=name if workers == 1 else None,
                                http_url=server.http_url,
                                refusal=_workers_refusal(workers), **measure)
        finally:
            server.stop()
    for row in measured.rows:
        row.update(workers=workers, batching=batching, **transport)
    out["onnxserve"].extend(measured.rows)
    for item in measured.not_measured:
        out["perf_analyzer_not_measured"].append(
            {"server": "onnxserve", "workers": workers, "batching": batching, **transport,
             **item})


def _load_cell(row: dict) -> str:
    return f"c={row['concurrency']}" if row["mode"] == "closed" else f"{row['rate']}/s"


def _by_load(rows: list[dict]) -> dict[tuple, dict]:
    """Rows by (client label, mode, concurrency, rate): what a row is compared at."""
    return {(client_label(r), r["mode"], r["concurrency"], r["rate"]): r for r in rows}


def _ratio(row: dict, references: dict[tuple, dict]) -> str:
    """``row``'s throughput over that of its reference at the same load and client (from
    _by_load), or "" where there is none."""
    ref = references.get((client_label(row), row["mode"], row["concurrency"], row["rate"]))
    return f"{row['throughput'] / ref['throughput']:.2f}" if ref and ref["throughput"] else ""


def markdown(results: list[dict], meta: dict) -> str:
    clients = meta.get("clients", ["python"])
    about = []
    if "python" in clients:
        about.append("`python`: one closed-loop grpc.aio client on the same machine "
                     "(pre-serialised requests, raw_input_contents), "
                     f"{meta['warmup']} s warm-up, {meta['window']} s windows until three "
                     "agree within 10%.")
    if "perf_analyzer" in clients:
        about.append("`perf_analyzer`: Triton's C++ load generator "
                     f"(`{meta.get('perf_analyzer')}`), over the protocol and mode its rows "
                     "name (plain: one synchronous thread per request in flight; streaming: "
                     "gRPC's ModelStreamInfer in its async mode; shared-memory: tensors in "
                     "system shared memory regions it registers), no warm-up, "
                     f"{meta['window']} s windows until three agree within 10% on throughput "
                     "and latency (else three more, marked unstable); its client CPU covers "
                     "its whole run, and none of it is Python's.")
    if any("grpc_transport" in r for res in results for r in res["onnxserve"]):
        about.append("`onnxserve (native)`: the server started with `--grpc-transport "
                     "native` (gRPC C++ in its process), `onnxserve (python)` with "
                     "`--grpc-transport python` (grpcio).")
    if any("null_cpp_server" in res for res in results):
        about.append(f"`null (C++)`: a do-nothing KServe V2 gRPC server written in C++ "
                     f"(`{meta.get('cpp_null', '?')}`, {CPP_NULL_THREADS} threads), "
                     "answering zeros as the Python null server does; \"vs C++ null\" "
                     "divides a row's throughput by its row at the same load and client.")
    lines = ["# Serving benchmark", "",
             f"Generated by `{meta['command']}` on {meta['machine']}. " + " ".join(about)
             + " Throughput in inferences/s; latencies per request.", ""]
    for res in results:
        raw = res["raw_onnxruntime"]
        best = max(r["throughput"] for r in raw.values())
        cpp = "null_cpp_server" in res
        lines += [f"## {res['model']} ({res['samples_per_request']} sample(s) per request)", "",
                  "raw onnxruntime in-process: " + ", ".join(
                      f"batch {b}: {r['throughput']:.0f}/s (p50 {r['p50_ms']:.3f} ms)"
                      for b, r in raw.items()), "",
                  "| server | workers | batching | load | client | inf/s | vs raw best | vs null "
                  + ("| vs C++ null " if cpp else "")
                  + "| p50 ms | p90 | p99 | errors | mean batch | queue ms | compute ms "
                  "| client CPU % | server CPU % |",
                  "|---" * (18 if cpp else 17) + "|"]
        null, cpp_null = _by_load(res["null_server"]), _by_load(res.get("null_cpp_server", []))
        for server, rows in (("null", res["null_server"]),
                             ("null (parse)", res.get("null_parse_server", [])),
                             ("null (C++)", res.get("null_cpp_server", [])),
                             ("onnxserve", res["onnxserve"])):
            for r in rows:
                client = client_label(r)
                load = _load_cell(r)
                vs_null = _ratio(r, null) if server != "null" else ""
                vs_cpp = ("" if not cpp else
                          f"{_ratio(r, cpp_null) if server != 'null (C++)' else ''} | ")

                def fmt(key: str, digits: int = 2, row: dict = r) -> str:
                    value = row.get(key)
                    return "" if value is None else f"{value:.{digits}f}"

                lines.append(
                    f"| {server_label(r) if server == 'onnxserve' else server} | "
                    f"{r.get('workers', '')} | {r.get('batching', '')} | {load} | "
                    f"{client}{'' if r.get('stable', True) else ' (unstable)'} | "
                    f"{r['throughput']:.0f} | {r['throughput'] / best:.2f} | {vs_null} | "
                    f"{vs_cpp}{fmt('p50_ms')} | {fmt('p90_ms')} | {fmt('p99_ms')} | "
                    f"{r['errors']} | "
                    f"{fmt('mean_batch', 1)} | {fmt('server_queue_ms', 3)} | "
                    f"{fmt('server_compute_ms', 3)} | {r['client_cpu_percent']:.0f} | "
                    f"{r['server_cpu_percent']:.0f} |"
                )
        lines.append("")
        if res.get("null_cpp_not_measured"):
            lines += [f"The C++ null server measured nothing of {res['model']}: "
                      f"{res['null_cpp_not_measured']}", ""]
        lines += _not_measured_lines(res.get("perf_analyzer_not_measured", []))
    return "\n".join(lines)


def _not_measured_lines(items: list[dict]) -> list[str]:
    """One paragraph per server, transport and reason perf_analyzer did not measure,
    naming the loads for onnxserve. The null server answers perf_analyzer over unary gRPC
    only, so when that fails, its rows are the Python client's only."""
    groups: dict[tuple[str, str, str, bool], list[str]] = {}
    for item in items:
        null = item["server"].startswith("null")
        where = (f"the {item['server']} server" if null
                 else f"{server_label(item)}, {item['workers']} worker(s), batching "
                      f"{item['batching']},")
        unary_grpc = (item.get("pa_protocol", "grpc"), item.get("pa_mode", "plain")) == (
            "grpc", "plain")
        key = (where, client_label(item), item["reason"], null and unary_grpc)
        groups.setdefault(key, []).append(_load_cell(item))
    lines = []
    for (where, client, reason, python_only), loads in groups.items():
        if python_only:
            lines.append(f"perf_analyzer cannot measure {where}, whose rows are the Python "
                         f"client's only: {reason}")
        elif where.startswith("the null"):
            lines.append(f"{client} does not measure {where}: {reason}")
        else:
            lines.append(f"{client} did not measure {where} at {', '.join(loads)}: {reason}")
        lines.append("")
    return lines


#: What to do to get the plot.
PLOT_HINT = "pip install matplotlib"


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: list[dict], path: Path) -> bool:
    """Draw latency against throughput to ``path`` (PNG); False, drawing nothing, when
    matplotlib is not installed (PLOT_HINT)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        series: dict[str, list] = {}
        nulls = [(r, "null server") for r in res["null_server"]]
        nulls += [(r, "null server (parse)") for r in res.get("null_parse_server", [])]
        nulls += [(r, "null server (C++)") for r in res.get("null_cpp_server", [])]
        for r, null_label in [*nulls, *((r, "") for r in res["onnxserve"])]:
            key = (null_label if "workers" not in r
                   else f"{server_label(r)} w={r['workers']} batching {r['batching']}")
            if r.get("client", "python") != "python":
                key += f", {client_label(r)}"
            series.setdefault(key, []).append(r)
        for label, rows in series.items():
            rows = [r for r in rows if r["mode"] == "closed"]
            ax.plot([r["throughput"] for r in rows], [r["p50_ms"] for r in rows], marker="o",
                    label=label, linestyle="--" if "perf_analyzer" in label else "-")
        best = max(r["throughput"] for r in res["raw_onnxruntime"].values())
        ax.axvline(best, color="grey", linestyle="--", label="raw onnxruntime best")
        ax.set_title(res["model"])
        ax.set_xlabel("inferences/s")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def bounded(kind: type, minimum: float, inclusive: bool, unit: str = ""):
    """An argparse type: a ``kind`` (int or float) at least (or above) ``minimum``."""
    what = {int: "a whole number", float: "a number"}[kind] + (f" of {unit}" if unit else "")

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            bound = (f"{minimum:g} or more" if inclusive and kind is int
                     else f"{'at least' if inclusive else 'more than'} {minimum:g}")
            raise argparse.ArgumentTypeError(
                f"{text}: expected {bound}" + (f" {unit}" if unit else ""))
        return value

    return parse


_positive_int = bounded(int, 1, inclusive=True)
_rate = bounded(float, 0, inclusive=False, unit="requests/s")


def _seconds(minimum: float, inclusive: bool):
    return bounded(float, minimum, inclusive, unit="seconds")


DESCRIPTION = (
    "Serving benchmark: for each model, raw onnxruntime in-process, a do-nothing gRPC server "
    "(the transport's ceiling), then onnxserve with batching on/off and 1 or more workers, "
    "each at every --concurrency (closed loop) and --rate (open loop). Each configuration "
    "takes --warmup + 3 to --max-windows x --window seconds (11-20 s with the defaults); the "
    "defaults measure 20 configurations per model, about 8-14 minutes for the two default "
    "models. The run prints [n/total] before each configuration, and the time it expects "
    "first. --client perf_analyzer measures with Triton's C++ perf_analyzer instead (fetched "
    "on first use), --client both with each in turn: its figures leave out the Python "
    "client's CPU."
)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="throughput/latency benchmark against raw "
                                            "onnxruntime and a null server",
                              description=DESCRIPTION)
    p.add_argument("--models", nargs="+", default=["lenet5", "mobilenet_v2"],
                   help="models of the repository to measure (default: lenet5 mobilenet_v2)")
    p.add_argument("--concurrency", type=_positive_int, nargs="+", default=[1, 4, 16, 64],
                   help="closed-loop loads: requests in flight at once (default: 1 4 16 64)")
    p.add_argument("--rate", type=_rate, nargs="*", default=[],
                   help="open-loop Poisson request rates (requests/s) to add (default: none)")
    p.add_argument("--batching", nargs="+", choices=("on", "off"), default=["on", "off"],
                   help="measure onnxserve with the model's dynamic batching on, off, or both "
                        "(default: on off)")
    p.add_argument("--workers", type=_positive_int, nargs="+", default=[1, 2],
                   help="server processes (onnxserve serve --workers) to measure with "
                        "(default: 1 2)")
    p.add_argument("--samples-per-request", type=_positive_int, default=1,
                   help="samples in each request's batch (default %(default)s)")
    p.add_argument("--warmup", type=_seconds(0, inclusive=True), default=2.0,
                   help="seconds of load before each configuration's measurement "
                        "(default %(default)s)")
    p.add_argument("--window", type=_seconds(0, inclusive=False), default=3.0,
                   help="seconds per measurement window; windows repeat until the last three "
                        "agree within 10%% (default %(default)s)")
    p.add_argument("--max-windows", type=_positive_int, default=6,
                   help="most windows per configuration, stable or not (default %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="folder for <tag>.json, <tag>.md and <tag>.png (default ./%(default)s; "
                        "make bench writes the committed benchmarks/results)")
    p.add_argument("--tag", default="bench", help="output file name stem (default %(default)s)")
    p.add_argument("--null-parse", action="store_true",
                   help="also measure a do-nothing server that parses each request and builds "
                        "each response (protobuf's share of a request)")
    p.add_argument("--client", choices=tuple(CLIENTS), default="python",
                   help="load generator: the Python grpc.aio client, Triton's C++ "
                        "perf_analyzer (its figures exclude the Python client's CPU), or both, "
                        "each configuration measured by one then the other (default "
                        "%(default)s)")
    p.add_argument("--perf-analyzer", type=Path, metavar="PATH",
                   help=f"the perf_analyzer binary for --client perf_analyzer/both (default: "
                        f"${ENV_VAR}, else perf_analyzer in $XDG_CACHE_HOME/onnxserve/"
                        "perf_analyzer (XDG_CACHE_HOME: ~/.cache when unset), else fetched "
                        "there with pip download: the tritonclient 2.41.0 and "
                        "nvidia-cuda-runtime-cu12 wheels; it also needs apt-get install "
                        "libb64-0d)")
    p.add_argument("--pa-protocol", nargs="+", choices=PA_PROTOCOLS, metavar="PROTOCOL",
                   help="perf_analyzer's protocols, each measured in turn: grpc (the gRPC "
                        "port) and/or http (the HTTP/REST port) (default: grpc)")
    p.add_argument("--pa-mode", nargs="+", choices=PA_MODES, metavar="MODE",
                   help="how perf_analyzer sends each request, each measured in turn: plain "
                        "(one call, one answer), streaming (gRPC's ModelStreamInfer, async; "
                        "gRPC only), shared-memory (tensors in system shared memory regions "
                        "it registers; --workers 1 only) (default: plain)")
    p.add_argument("--grpc-transport", nargs="+", choices=GRPC_TRANSPORTS,
                   metavar="TRANSPORT",
                   help="measure each onnxserve set-up once per gRPC transport, passing "
                        "onnxserve serve --grpc-transport: native (gRPC C++ in the server's "
                        "process) and/or python (grpcio); each row names it (default: none "
                        "passed, the server's own choice)")
    p.add_argument("--cpp-null", type=Path, metavar="PATH",
                   help="also measure this do-nothing KServe V2 gRPC server written in C++ "
                        f"(run as PATH --port P --threads {CPP_NULL_THREADS} --host "
                        "127.0.0.1; serving the measured models by name) beside the Python "
                        "null server, with the same clients and loads: rows 'null (C++)' and "
                        "a 'vs C++ null' column")
    p.set_defaults(func=run_bench)
    return p  # the caller adds --model-repository (a setting of the server's)


def _cpp_null_problem(binary: Path) -> str | None:
    """Why ``binary`` (--cpp-null) cannot be the C++ null server without running it, or
    None."""
    if not binary.exists():
        return "no such file"
    if not binary.is_file():
        return "not a file"
    if not os.access(binary, os.X_OK):
        return "not executable"
    return None


def _cpp_null_starts(binary: Path) -> str | None:
    """Why the C++ null server ``binary`` does not serve when started as bench_model
    starts it (start_cpp_null), or None: a trial start before anything is measured."""
    null = start_cpp_null(binary)
    try:
        null.wait_ready(CPP_NULL_START_S)
    except RuntimeError as exc:
        return f"it did not start serving: {str(exc).strip()}"
    finally:
        null.stop()
    return None


def run_bench(args: argparse.Namespace) -> int:
    missing = [m for m in args.models if not (args.model_repository / m).is_dir()]
    if missing:
        print(f"onnxserve bench: {', '.join(missing)} not in {args.model_repository}; export "
              "them first (make demo exports lenet5 and mobilenet_v2)", file=sys.stderr)
        return 2
    cpp_null = getattr(args, "cpp_null", None)
    problem = None if cpp_null is None else _cpp_null_problem(cpp_null)
    if problem:
        print(f"onnxserve bench: --cpp-null {cpp_null}: {problem}", file=sys.stderr)
        return 2
    if "native" in (getattr(args, "grpc_transport", None) or []):
        from onnxserve.serving.frontends import native

        if native.transport is None:
            print("onnxserve bench: --grpc-transport native: the native gRPC transport is not "
                  f"built ({native.BUILD_PROBLEM}): install gRPC C++ (Debian/Ubuntu: apt-get "
                  "install libgrpc++-dev pkg-config) and reinstall onnxserve "
                  "(docs/serving.md), or measure --grpc-transport python only",
                  file=sys.stderr)
            return 2
    clients = _clients(args)
    for flag, value in (("--perf-analyzer", args.perf_analyzer),
                        ("--pa-protocol", getattr(args, "pa_protocol", None)),
                        ("--pa-mode", getattr(args, "pa_mode", None))):
        if value is not None and "perf_analyzer" not in clients:
            print(f"onnxserve bench: {flag} applies to --client perf_analyzer or both, not "
                  f"--client {args.client}", file=sys.stderr)
            return 2
    if "perf_analyzer" in clients and not _transports(args):
        print("onnxserve bench: --pa-mode streaming needs --pa-protocol grpc (perf_analyzer "
              "streams over gRPC only)", file=sys.stderr)
        return 2
    if "perf_analyzer" in clients and "streaming" in (args.pa_mode or []) and set(
            args.pa_protocol or []) - {"grpc"}:
        print("note: perf_analyzer streams over gRPC only, so streaming is measured over "
              "grpc alone", flush=True)
    analyzer = None
    if "perf_analyzer" in clients:
        try:
            analyzer = find_perf_analyzer(args.perf_analyzer,
                                          log=lambda line: print(line, flush=True))
            version = analyzer.version()
        except (PerfAnalyzerMissing, PerfAnalyzerFailed) as exc:
            print(f"onnxserve bench: --client {args.client} needs perf_analyzer: {exc}",
                  file=sys.stderr)
            return 2
        print(f"perf_analyzer: {analyzer.binary} ({version})", flush=True)
    if cpp_null is not None:
        problem = _cpp_null_starts(cpp_null)
        if problem:
            print(f"onnxserve bench: --cpp-null {cpp_null}: {problem}", file=sys.stderr)
            return 2
    per_model = configurations_per_model(args)
    if clients == ("python",):
        each = f"{per_model} configurations, {_duration_range(*configuration_seconds(args))} each"
    else:
        runs = [client if transport is None else f"{client} ({transport.label})"
                for client, transport in _runs(args)]
        span = {c: _duration_range(*client_seconds(args, c)) for c in clients}
        each = (f"{per_model * len(runs)} measurements ({per_model} configurations, each by "
                + " and ".join(f"{run} ({span[run.split(' ')[0]]})" for run in runs) + ")")
    print(f"onnxserve bench: {len(args.models)} model(s) x {each}: about "
          f"{_duration_range(*expected_seconds(args, len(args.models)))} plus server "
          f"start-ups; results to {args.out}", flush=True)
    if not _matplotlib_available():  # say it now, not only after the run
        print(f"note: matplotlib is not installed, so there will be no {args.tag}.png "
              f"({PLOT_HINT} for it)", flush=True)
    progress = Progress(measurements_per_model(args) * len(args.models))
    results = [bench_model(args.model_repository, m, args, progress, analyzer)
               for m in args.models]
    meta = {"command": "onnxserve bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2
            else "onnxserve bench", "machine": f"{this_cpu()}, no GPU",
            "warmup": args.warmup, "window": args.window, "clients": list(clients)}
    if analyzer is not None:
        meta["perf_analyzer"] = version
    if getattr(args, "grpc_transport", None):
        meta["grpc_transports"] = _grpc_transports(args)
    if cpp_null is not None:
        meta["cpp_null"] = str(cpp_null)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "results": results},
                                                          indent=2) + "\n")
    (args.out / f"{args.tag}.md").write_text(markdown(results, meta))
    png = args.out / f"{args.tag}.png"
    if plot(results, png):
        print(f"wrote {png}")
    else:
        stale = png.is_file()
        if stale:
            png.unlink()  # drawn from another run's results
        print(f"no plot: matplotlib is not installed ({PLOT_HINT} for {png.name})"
              + (f"; removed {png}, an earlier run's plot" if stale else ""), flush=True)
    print(f"wrote {args.out / (args.tag + '.json')}")
    print(f"wrote {args.out / (args.tag + '.md')}")
    failed = [(r["model"], item) for r in results
              for item in r.get("perf_analyzer_not_measured", [])
              if not item["server"].startswith("null") and not item.get("skipped")]
    for model, item in failed:
        print(f"onnxserve bench: {client_label(item)} failed on {model}, {server_label(item)} "
              f"{item['workers']} worker(s), batching {item['batching']}, {_load_cell(item)}: "
              f"{item['reason']}", file=sys.stderr)
    return 1 if failed else 0
