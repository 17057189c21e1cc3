"""`onnxserve bench`: served throughput and latency against raw onnxruntime and a null server.

    onnxserve bench --model-repository DIR --models lenet5 mobilenet_v2

For each model: raw onnxruntime in-process (batch 1 and larger), a do-nothing gRPC
server with the same client (the transport's ceiling), then onnxserve with dynamic
batching on and off and 1 or more worker processes, each at every concurrency (closed
loop) or request rate (open loop). Reports inferences/s, p50/p90/p95/p99, errors, client
and server CPU, and the server's own queue/compute split from ModelStatistics. Writes
bench.json, bench.md and bench.png (with matplotlib) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxserve.clients.client import Client
from onnxserve.serving.demo import die_with_parent, free_port
from onnxserve.serving.repository import read_model

from .load import build_request, run_load
from .raw_onnxruntime import raw_onnxruntime

RESULTS = Path(__file__).resolve().parent / "results"
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


class Process:
    """A server process this benchmark started, stopped by its PID; its output goes to
    ``log_path`` (a temporary file when None)."""

    def __init__(self, command: list[str], url: str, log_path: Path | None = None) -> None:
        self.url = url
        self.log = log_path.open("w+b") if log_path else tempfile.TemporaryFile()
        self.popen = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                      preexec_fn=die_with_parent)

    def tail(self, size: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-size:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for readiness; raise when the server exits or a model fails to load."""
        with Client(self.url, timeout=2.0) as client:
            try:
                client.wait_until_ready(timeout, alive=lambda: self.popen.poll() is None)
            except RuntimeError as exc:
                self.stop()
                raise RuntimeError(f"{exc}:\n{self.tail()}") from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _sample(config) -> np.ndarray:
    (tensor,) = config.input
    dims = list(tensor.dims)
    rng = np.random.default_rng(0)
    if tensor.data_type == 2:  # TYPE_UINT8
        return rng.integers(0, 256, dims, dtype=np.uint8)
    return rng.random(dims, dtype=np.float32)


def _variant_repository(source: Path, name: str, target: Path, batching: bool) -> None:
    """A repository holding ``name`` with dynamic batching switched on or off."""
    from google.protobuf import text_format

    folder = target / name
    shutil.copytree(source / name, folder, symlinks=True)
    config = read_model(target, name).config
    if not batching:
        config.ClearField("dynamic_batching")
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def _measure(url, payload, samples, args, pid, stats_name=None) -> list[dict]:
    rows = []
    loads = [("closed", c, None) for c in args.concurrency]
    loads += [("poisson", 0, r) for r in args.rate]
    for mode, concurrency, rate in loads:
        before = _stats(url, stats_name)
        cpu0, t0 = _tree_cpu_seconds(pid), time.perf_counter()
        result = asyncio.run(run_load(
            url, payload, samples_per_request=samples, concurrency=concurrency or 1, rate=rate,
            warmup_s=args.warmup, window_s=args.window, max_windows=args.max_windows,
        ))
        server_cpu = 100 * (_tree_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
        row = {**result.as_dict(), "server_cpu_percent": round(server_cpu, 1)}
        after = _stats(url, stats_name)
        if before and after:
            n = after["success"]["count"] - before["success"]["count"]
            execs = after["execution_count"] - before["execution_count"]
            if n:
                row["server_queue_ms"] = (after["queue"]["ns"] - before["queue"]["ns"]) / n / 1e6
                row["server_compute_ms"] = (after["compute_infer"]["ns"]
                                            - before["compute_infer"]["ns"]) / n / 1e6
                row["mean_batch"] = (after["inference_count"] - before["inference_count"]) / max(
                    execs, 1)
        rows.append(row)
        print(f"  {mode} c={concurrency} rate={rate}: {row['throughput']:.0f}/s "
              f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms errors {row['errors']} "
              f"client cpu {row['client_cpu_percent']:.0f}% server cpu {server_cpu:.0f}%",
              flush=True)
    return rows


def _stats(url: str, name: str | None) -> dict | None:
    if name is None:
        return None
    with Client(url) as client:
        return client.statistics(name)[0]


def bench_model(repository: Path, name: str, args) -> dict:
    config = read_model(repository, name).config
    sample = _sample(config)
    batch = np.repeat(sample[np.newaxis], args.samples_per_request, axis=0)
    payload = build_request(name, {config.input[0].name: batch})
    model_file = next(iter(sorted((repository / name).glob("*/model.onnx"))))
    print(f"== {name}: raw onnxruntime", flush=True)
    raw = raw_onnxruntime(model_file, sample, batch_sizes=(1, 8, 32), seconds=args.window)
    for b, r in raw.items():
        print(f"  batch {b}: {r['throughput']:.0f}/s p50 {r['p50_ms']:.3f} ms", flush=True)
    out: dict = {"model": name, "samples_per_request": args.samples_per_request,
                 "raw_onnxruntime": raw, "null_server": [], "onnxserve": []}
    port = free_port()
    print(f"== {name}: null server", flush=True)
    null = Process([sys.executable, "-m", "onnxserve.benchmarks.null_server", "--port",
                    str(port), "--output-shape", *map(str, config.output[0].dims)],
                   f"127.0.0.1:{port}")
    try:
        null.wait_ready()
        out["null_server"] = _measure(null.url, payload, args.samples_per_request, args,
                                      null.popen.pid)
    finally:
        null.stop()
    for workers in args.workers:
        for batching in args.batching:
            with tempfile.TemporaryDirectory() as tmp:
                _variant_repository(repository, name, Path(tmp), batching == "on")
                port = free_port()
                print(f"== {name}: onnxserve workers={workers} batching={batching}", flush=True)
                server = Process(
                    [sys.executable, "-m", "onnxserve.serving.cli", "serve",
                     "--model-repository", tmp, "--grpc-host", "127.0.0.1",
                     "--grpc-port", str(port), "--workers", str(workers),
                     "--log-level", "WARNING", "--metrics-port", "0"],
                    f"127.0.0.1:{port}",
                )
                try:
                    server.wait_ready()
                    rows = _measure(server.url, payload, args.samples_per_request, args,
                                    server.popen.pid, stats_name=name if workers == 1 else None)
                finally:
                    server.stop()
                for row in rows:
                    row.update(workers=workers, batching=batching)
                out["onnxserve"].extend(rows)
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# Serving benchmark", "",
             f"Generated by `{meta['command']}` on {meta['machine']}. One closed-loop grpc.aio "
             "client on the same machine (pre-serialised requests, raw_input_contents), "
             f"{meta['warmup']} s warm-up, {meta['window']} s windows until three agree within "
             "10%. Throughput in inferences/s; latencies per request.", ""]
    for res in results:
        raw = res["raw_onnxruntime"]
        best = max(r["throughput"] for r in raw.values())
        lines += [f"## {res['model']} ({res['samples_per_request']} sample(s) per request)", "",
                  "raw onnxruntime in-process: " + ", ".join(
                      f"batch {b}: {r['throughput']:.0f}/s (p50 {r['p50_ms']:.3f} ms)"
                      for b, r in raw.items()), "",
                  "| server | workers | batching | load | inf/s | vs raw best | vs null | p50 ms "
                  "| p90 | p99 | errors | mean batch | queue ms | compute ms | client CPU % "
                  "| server CPU % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        null = {(r["mode"], r["concurrency"], r["rate"]): r for r in res["null_server"]}
        for server, rows in (("null", res["null_server"]), ("onnxserve", res["onnxserve"])):
            for r in rows:
                load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate']}/s"
                ref = null.get((r["mode"], r["concurrency"], r["rate"]))
                vs_null = (f"{r['throughput'] / ref['throughput']:.2f}"
                           if ref and server != "null" and ref["throughput"] else "")

                def fmt(key: str, digits: int = 2, row: dict = r) -> str:
                    value = row.get(key)
                    return "" if value is None else f"{value:.{digits}f}"

                lines.append(
                    f"| {server} | {r.get('workers', '')} | {r.get('batching', '')} | {load} | "
                    f"{r['throughput']:.0f} | {r['throughput'] / best:.2f} | {vs_null} | "
                    f"{fmt('p50_ms')} | {fmt('p90_ms')} | {fmt('p99_ms')} | {r['errors']} | "
                    f"{fmt('mean_batch', 1)} | {fmt('server_queue_ms', 3)} | "
                    f"{fmt('server_compute_ms', 3)} | {r['client_cpu_percent']:.0f} | "
                    f"{r['server_cpu_percent']:.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        series: dict[str, list] = {"null server": res["null_server"]}
        for r in res["onnxserve"]:
            key = f"onnxserve w={r['workers']} batching {r['batching']}"
            series.setdefault(key, []).append(r)
        for label, rows in series.items():
            rows = [r for r in rows if r["mode"] == "closed"]
            ax.plot([r["throughput"] for r in rows], [r["p50_ms"] for r in rows], marker="o",
                    label=label)
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


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    from onnxserve.serving.cli import add_repository_argument

    p = subparsers.add_parser("bench", help="throughput/latency benchmark against raw "
                                            "onnxruntime and a null server")
    add_repository_argument(p)
    p.add_argument("--models", nargs="+", default=["lenet5", "mobilenet_v2"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rate", type=float, nargs="*", default=[],
                   help="open-loop Poisson request rates (requests/s) to add")
    p.add_argument("--batching", nargs="+", choices=("on", "off"), default=["on", "off"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples-per-request", type=int, default=1)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds (default %(default)s)")
    p.add_argument("--window", type=float, default=3.0, help="seconds (default %(default)s)")
    p.add_argument("--max-windows", type=int, default=6)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="bench", help="output file name stem (default %(default)s)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    missing = [m for m in args.models if not (args.model_repository / m).is_dir()]
    if missing:
        print(f"onnxserve bench: {', '.join(missing)} not in {args.model_repository}; export "
              "them first (make demo exports lenet5 and mobilenet_v2)", file=sys.stderr)
        return 2
    results = [bench_model(args.model_repository, m, args) for m in args.models]
    meta = {"command": "onnxserve bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2
            else "onnxserve bench", "machine": f"{os.cpu_count()} cores, no GPU",
            "warmup": args.warmup, "window": args.window}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "results": results},
                                                          indent=2) + "\n")
    (args.out / f"{args.tag}.md").write_text(markdown(results, meta))
    if plot(results, args.out / f"{args.tag}.png"):
        print(f"wrote {args.out / (args.tag + '.png')}")
    print(f"wrote {args.out / (args.tag + '.md')}")
    return 0
