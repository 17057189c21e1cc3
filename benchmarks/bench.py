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

from onnxserve.clients.client import Client
from onnxserve.export.cpu import this_cpu
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
_TICKS = os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(pid: int) -> float:
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
    --null-parse) and on each onnxserve set-up (each measured once per client of --client)."""
    nulls = 2 if getattr(args, "null_parse", False) else 1
    return (nulls + len(args.workers) * len(args.batching)) * len(_loads(args))


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
            cpu0, t0 = _tree_cpu_seconds(pid), time.perf_counter()
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
            server_cpu = 100 * (_tree_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
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
    """Measure model ``name``: raw onnxruntime, the null server, then onnxserve with each
    --workers and --batching at each load, with each client of --client (``analyzer``
    runs the perf_analyzer ones); ``progress`` numbers the configurations.

    The result's ``perf_analyzer_not_measured`` lists each load perf_analyzer failed at
    or did not try (``skipped``), with the server (``null`` or ``onnxserve`` with its
    workers and batching), the transport (``pa_protocol``, ``pa_mode``) and the reason."""
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
    for workers in args.workers:
        for batching in args.batching:
            with tempfile.TemporaryDirectory() as tmp:
                _variant_repository(repository, name, Path(tmp), batching == "on")
                server = ServerProcess.serve(Path(tmp), "--workers", str(workers),
                                             "--log-level", "WARNING")
                what = (f"{name} onnxserve, batching {batching}, {workers} "
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
                    row.update(workers=workers, batching=batching)
                out["onnxserve"].extend(measured.rows)
                for item in measured.not_measured:
                    out["perf_analyzer_not_measured"].append(
                        {"server": "onnxserve", "workers": workers, "batching": batching,
                         **item})
    return out


def _load_cell(row: dict) -> str:
    return f"c={row['concurrency']}" if row["mode"] == "closed" else f"{row['rate']}/s"


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
    lines = ["# Serving benchmark", "",
             f"Generated by `{meta['command']}` on {meta['machine']}. " + " ".join(about)
             + " Throughput in inferences/s; latencies per request.", ""]
    for res in results:
        raw = res["raw_onnxruntime"]
        best = max(r["throughput"] for r in raw.values())
        lines += [f"## {res['model']} ({res['samples_per_request']} sample(s) per request)", "",
                  "raw onnxruntime in-process: " + ", ".join(
                      f"batch {b}: {r['throughput']:.0f}/s (p50 {r['p50_ms']:.3f} ms)"
                      for b, r in raw.items()), "",
                  "| server | workers | batching | load | client | inf/s | vs raw best | vs null "
                  "| p50 ms | p90 | p99 | errors | mean batch | queue ms | compute ms "
                  "| client CPU % | server CPU % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        null = {(client_label(r), r["mode"], r["concurrency"], r["rate"]): r
                for r in res["null_server"]}
        for server, rows in (("null", res["null_server"]),
                             ("null (parse)", res.get("null_parse_server", [])),
                             ("onnxserve", res["onnxserve"])):
            for r in rows:
                client = client_label(r)
                load = _load_cell(r)
                ref = null.get((client, r["mode"], r["concurrency"], r["rate"]))
                vs_null = (f"{r['throughput'] / ref['throughput']:.2f}"
                           if ref and server != "null" and ref["throughput"] else "")

                def fmt(key: str, digits: int = 2, row: dict = r) -> str:
                    value = row.get(key)
                    return "" if value is None else f"{value:.{digits}f}"

                lines.append(
                    f"| {server} | {r.get('workers', '')} | {r.get('batching', '')} | {load} | "
                    f"{client}{'' if r.get('stable', True) else ' (unstable)'} | "
                    f"{r['throughput']:.0f} | {r['throughput'] / best:.2f} | {vs_null} | "
                    f"{fmt('p50_ms')} | {fmt('p90_ms')} | {fmt('p99_ms')} | {r['errors']} | "
                    f"{fmt('mean_batch', 1)} | {fmt('server_queue_ms', 3)} | "
                    f"{fmt('server_compute_ms', 3)} | {r['client_cpu_percent']:.0f} | "
                    f"{r['server_cpu_percent']:.0f} |"
                )
        lines.append("")
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
                 else f"onnxserve, {item['workers']} worker(s), batching {item['batching']},")
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
        for r, null_label in [*nulls, *((r, "") for r in res["onnxserve"])]:
            key = (null_label if "workers" not in r
                   else f"onnxserve w={r['workers']} batching {r['batching']}")
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


def _bounded(kind: type, minimum: float, inclusive: bool, unit: str = ""):
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


_positive_int = _bounded(int, 1, inclusive=True)
_rate = _bounded(float, 0, inclusive=False, unit="requests/s")


def _seconds(minimum: float, inclusive: bool):
    return _bounded(float, minimum, inclusive, unit="seconds")


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
    p.set_defaults(func=run_bench)
    return p  # the caller adds --model-repository (a setting of the server's)


def run_bench(args: argparse.Namespace) -> int:
    missing = [m for m in args.models if not (args.model_repository / m).is_dir()]
    if missing:
        print(f"onnxserve bench: {', '.join(missing)} not in {args.model_repository}; export "
              "them first (make demo exports lenet5 and mobilenet_v2)", file=sys.stderr)
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
        print(f"onnxserve bench: {client_label(item)} failed on {model}, onnxserve "
              f"{item['workers']} worker(s), batching {item['batching']}, {_load_cell(item)}: "
              f"{item['reason']}", file=sys.stderr)
    return 1 if failed else 0
