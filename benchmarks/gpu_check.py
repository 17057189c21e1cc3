"""The GPU check: active providers, parity GPU vs CPU on the exported seed models, raw
onnxruntime throughput per batch size, and served throughput and latency through onnxserve
with dynamic batching; the summary table is printed last and saved as gpu_check.md/.json.

Run it through benchmarks/gpu_check.sh, which sets up onnxruntime-gpu and the models from
the working tree (see benchmarks/README.md). Raw onnxruntime here is what a user of the
library would write: ``session.run`` with numpy arrays, copies to and from the GPU included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxserve.benchmarks.load import INFER_METHOD, build_request
from onnxserve.protos.limits import MAX_MESSAGE_BYTES
from onnxserve.protos.naming import version_folder
from onnxserve.serving.process import ServerProcess

RAW_MODELS = ("resnet50_fp16", "resnet50", "mobilenet_v2_fp16", "mobilenet_v2")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
CONCURRENCIES = (1, 16, 64, 192)
#: the issue's targets
SERVED_RAW_TARGET = 0.85
P50_MARGIN_MS = 1.0
COLD_RATIO = 2.0


class Budget:
    """Wall-clock budget: later parts are skipped (and said so) when it runs out."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def allows(self, seconds: float) -> bool:
        return time.monotonic() + seconds < self.deadline


def _log(message: str) -> None:
    print(message, flush=True)


def _model_file(repository: Path, name: str) -> Path:
    """The newest version's model file (version folders as the server reads them)."""
    versions = {version_folder(p.name): p for p in (repository / name).iterdir()}
    versions.pop(None, None)
    return versions[max(versions)] / "model.onnx"


def _sample(session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {}
    for arg in session.get_inputs():
        shape = [batch if not isinstance(d, int) or d < 0 else d for d in arg.shape]
        if arg.type == "tensor(uint8)":
            inputs[arg.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif arg.type == "tensor(float16)":
            inputs[arg.name] = rng.random(shape).astype(np.float16)
        else:
            inputs[arg.name] = rng.random(shape, dtype=np.float32)
    return inputs


def environment() -> dict:
    import onnxruntime as ort

    from onnxserve.serving.runtime.devices import cuda_device_count, cuda_device_name
    from onnxserve.serving.runtime.providers import usable_gpus

    gpus, why_not = usable_gpus()
    return {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
            "cuda_devices": cuda_device_count(), "usable_gpus": gpus, "why_not": why_not,
            "card": cuda_device_name(0), "python": platform.python_version(),
            "cpus": os.cpu_count()}


def parity(repository: Path, names: list[str], providers: str = "cuda",
           budget: Budget | None = None) -> list[dict]:
    """Each model on GPU 0 and on the CPU through onnxserve's instance, same inputs
    (``providers`` cpu: a dry run, both on the CPU, the first with I/O binding)."""
    from onnxserve.serving.runtime.devices import Device
    from onnxserve.serving.runtime.instance import SessionInstance
    from onnxserve.serving.runtime.sessions import GpuSettings
    from onnxserve.serving.runtime.topk import best_k

    rows = []
    for name in names:
        if budget is not None and not budget.allows(0):
            rows.append({"model": name, "error": "skipped: out of time"})
            continue
        path = _model_file(repository, name)
        try:
            if providers == "cuda":
                gpu = SessionInstance(path, model_name=name, providers="cuda",
                                      device=Device("gpu", 0))
            else:
                gpu = SessionInstance(path, model_name=name, providers="cpu",
                                      gpu=GpuSettings(io_binding=True))
            cpu = SessionInstance(path, model_name=name, providers="cpu")
            inputs = _sample(gpu._session, 4)
            output = gpu.signature.outputs[0].name
            on_gpu = gpu.run(inputs, [output])
            _, best = gpu.run_with_top_k(inputs, [], {output: 5})  # top-k where it ran
            on_cpu = cpu.run(inputs, [output])[output].astype(np.float64)
            got = on_gpu[output].astype(np.float64)
            scale = float(np.abs(on_cpu).max()) or 1.0
            cpu_best = best_k(on_cpu.reshape(len(on_cpu), -1), 5)
            row = {
                "model": name, "provider": gpu.provider, "io": gpu.describe(),
                "max_abs_diff": float(np.abs(got - on_cpu).max()),
                "max_rel_diff": float(np.abs(got - on_cpu).max() / scale),
                "top1_agree": float(np.mean(got.reshape(4, -1).argmax(1)
                                            == on_cpu.reshape(4, -1).argmax(1))),
                "top5_same": float(np.mean([set(a) == set(b) for a, b in zip(
                    best[output].indices.tolist(), cpu_best.indices.tolist(), strict=True)])),
            }
        except Exception as exc:  # one model's failure is a row, not the end of the check
            row = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        _log(f"parity {name}: {row}")
    return rows


def _timed_runs(run, seconds: float) -> list[float]:
    for _ in range(3):
        run()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def raw(repository: Path, name: str, batches: tuple[int, ...], seconds: float,
        cuda_options: dict[str, str] | None = None, providers: str = "cuda") -> dict[int, dict]:
    """Back-to-back ``session.run`` at each batch size on GPU 0 (or the CPU)."""
    import onnxruntime as ort

    chain: list = [("CUDAExecutionProvider", {"device_id": "0", **(cuda_options or {})}),
                   "CPUExecutionProvider"] if providers == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(_model_file(repository, name)), providers=chain)
    if providers == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"{name}: the session is on {session.get_providers()}")
    results = {}
    for batch in batches:
        inputs = _sample(session, batch)
        times = _timed_runs(lambda inputs=inputs: session.run(None, inputs), seconds)
        results[batch] = {"throughput": batch * len(times) / sum(times),
                          "p50_ms": float(np.median(times) * 1e3),
                          "p99_ms": float(np.percentile(times, 99) * 1e3)}
        _log(f"raw {name} batch {batch}: {results[batch]['throughput']:.0f}/s, "
             f"p50 {results[batch]['p50_ms']:.2f} ms")
    return results


# --- served ---------------------------------------------------------------------------

def _serving_repository(source: Path, names: list[str], target: Path, instances: int,
                        kind: int, largest: int) -> None:
    from google.protobuf import text_format

    from onnxserve.serving.models.repository import parse_config

    for name in names:
        folder = target / name
        folder.mkdir(parents=True)
        for path in (source / name).iterdir():
            if path.is_dir():  # version folders: the model files stay where they are
                (folder / path.name).symlink_to(path.resolve())
            elif path.name != "config.pbtxt":
                shutil.copy2(path, folder / path.name)
        config_file = source / name / "config.pbtxt"
        config = parse_config(config_file.read_text() if config_file.is_file() else "", name)
        config.max_batch_size = min(config.max_batch_size or largest, largest)
        del config.instance_group[:]
        config.instance_group.add(count=instances, kind=kind)
        config.dynamic_batching.SetInParent()
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def _load_worker(url: str, payload: bytes, concurrency: int, window_start: float,
                 measure_s: float) -> tuple[list[float], int, float]:
    """One client process: closed loop at ``concurrency`` until the window (wall-clock
    ``window_start`` plus ``measure_s``, the same for every process) ends; latencies (ms)
    of the calls that started and finished inside it."""
    import grpc

    async def main() -> tuple[list[float], int, float]:
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(url, options=options)
                    for _ in range(max(1, min(concurrency, 2)))]
        methods = [c.unary_unary(INFER_METHOD) for c in channels]
        latencies: list[float] = []
        errors = 0
        stop = window_start + measure_s

        async def worker(method) -> None:
            nonlocal errors
            while time.time() < stop:
                start, wall = time.perf_counter(), time.time()
                try:
                    await method(payload, timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if wall >= window_start and time.time() <= stop:
                    latencies.append((time.perf_counter() - start) * 1e3)

        await asyncio.gather(*(worker(methods[i % len(methods)]) for i in range(concurrency)))
        for channel in channels:
            await channel.close()
        return latencies, errors, measure_s

    return asyncio.run(main())


def served_load(pool, processes: int, url: str, payload: bytes, concurrency: int,
                measure_s: float = 4.0, warm_s: float = 1.5) -> dict:
    """Closed-loop load from up to ``processes`` client processes of ``pool`` at once."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    window_start = time.time() + 0.5 + warm_s  # every process is running by then
    parts = pool.starmap(_load_worker, [(url, payload, n, window_start, measure_s)
                                        for n in shares], chunksize=1)
    latencies = np.array([x for lat, _, _ in parts for x in lat])
    errors = sum(e for _, e, _ in parts)
    return {"concurrency": concurrency, "requests": int(latencies.size), "errors": errors,
            "throughput": latencies.size / measure_s,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
            "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else float("nan")}


def cold_shapes(url: str, name: str, sample: dict[str, np.ndarray], largest: int) -> dict:
    """Each batch size 1..largest four times in a row, in random order: the first call of a
    size would pay for a shape the model never saw; it is compared with the slowest of the
    three warm calls after it."""
    from onnxserve.clients.client import Client

    sizes = list(range(1, largest + 1))
    random.Random(0).shuffle(sizes)
    ratios = {}
    with Client(url, timeout=60.0) as client:
        for size in sizes:
            batch = {k: np.repeat(v[:1], size, axis=0) for k, v in sample.items()}
            times = []
            for _ in range(4):
                start = time.perf_counter()
                client.infer(name, batch)
                times.append(time.perf_counter() - start)
            ratios[size] = times[0] / max(times[1:])
    worst = max(ratios, key=ratios.get)
    return {"model": name, "sizes": len(sizes), "worst_size": worst,
            "worst_first_over_warm": ratios[worst],
            "median_first_over_warm": float(np.median(list(ratios.values())))}


def start_server(repository: Path, log: Path, timeout: float,
                 providers: str) -> ServerProcess:
    """``onnxserve serve`` on the repository, ready (or an error with its log's tail)."""
    server = ServerProcess.serve(repository, "--providers", providers, log_path=log)
    server.wait_ready(timeout)
    return server


# --- report ---------------------------------------------------------------------------

def summarise(result: dict) -> list[str]:
    env = result["environment"]
    lines = [f"card: {env['card'] or 'unknown'} ({env['usable_gpus']} usable GPU(s))",
             f"active provider: {result.get('active_provider', 'none')}",
             f"onnxruntime {env['onnxruntime']}, Python {env['python']}, {env['cpus']} CPUs"]
    if env["why_not"]:
        lines.append(f"CUDA not usable: {env['why_not']}")
    for row in result.get("parity", []):
        if "error" in row:
            lines.append(f"parity {row['model']}: FAILED {row['error']}")
        else:
            lines.append(f"parity {row['model']}: {row['provider']}, max rel diff "
                         f"{row['max_rel_diff']:.1e}, top-1 agree {row['top1_agree']:.0%}, "
                         f"top-5 same {row['top5_same']:.0%}")
    for name in result.get("raw", {}):
        raw_rows = result["raw"][name]
        served = result.get("served", {}).get(name)
        if not raw_rows:
            continue
        best_batch = max(raw_rows, key=lambda b: raw_rows[b]["throughput"])
        best = raw_rows[best_batch]["throughput"]
        precision = "fp16" if name.endswith("_fp16") else "fp32"
        model = name.removesuffix("_fp16")
        text = f"{model} {precision}: raw best {best:.0f}/s (batch {best_batch})"
        if served:
            top = max(served, key=lambda r: r["throughput"])
            one = next((r for r in served if r["concurrency"] == 1), None)
            text += (f", served best {top['throughput']:.0f}/s (c={top['concurrency']}, "
                     f"p50 {top['p50_ms']:.1f} ms, p99 {top['p99_ms']:.1f} ms), "
                     f"served/raw {top['throughput'] / best:.2f}")
            if one is not None and 1 in raw_rows:
                text += (f"; c=1 p50 {one['p50_ms']:.2f} ms vs raw batch-1 "
                         f"{raw_rows[1]['p50_ms']:.2f} ms "
                         f"(+{one['p50_ms'] - raw_rows[1]['p50_ms']:.2f} ms)")
        lines.append(text)
    for name, ab in result.get("prefer_nhwc", {}).items():
        lines.append(f"prefer_nhwc {name}: " + ", ".join(
            f"batch {b}: NHWC/default {r:.2f}" for b, r in ab.items()))
    cold = result.get("cold_shapes")
    if cold:
        lines.append(f"cold shapes ({cold['model']}, sizes 1..{cold['sizes']}): worst first call /"
                     f"slowest warm call {cold['worst_first_over_warm']:.2f} (batch "
                     f"{cold['worst_size']}), median {cold['median_first_over_warm']:.2f}")
    if result.get("gpu_tests"):
        lines.append(f"GPU tests: {result['gpu_tests']}")
    lines += result.get("targets", [])
    lines += [f"skipped: {s}" for s in result.get("skipped", [])]
    return lines


def targets(result: dict) -> list[str]:
    out = []
    raw_rows = result.get("raw", {}).get("resnet50_fp16")
    served = result.get("served", {}).get("resnet50_fp16")
    if raw_rows and served:
        best = max(r["throughput"] for r in raw_rows.values())
        ratio = max(r["throughput"] for r in served) / best
        verdict = "met" if ratio >= SERVED_RAW_TARGET else "MISSED"
        out.append(f"target served/raw >= {SERVED_RAW_TARGET} (resnet50 fp16): {ratio:.2f} "
                   f"{verdict}")
    for name, served in result.get("served", {}).items():
        one = next((r for r in served if r["concurrency"] == 1), None)
        raw_one = result.get("raw", {}).get(name, {}).get(1)
        if one and raw_one:
            extra = one["p50_ms"] - raw_one["p50_ms"]
            verdict = "met" if extra <= P50_MARGIN_MS else "MISSED"
            out.append(f"target c=1 p50 within {P50_MARGIN_MS} ms of raw ({name}): "
                       f"+{extra:.2f} ms {verdict}")
    cold = result.get("cold_shapes")
    if cold:
        ratio = cold["worst_first_over_warm"]
        out.append(f"target no cold-shape request over {COLD_RATIO}x: worst {ratio:.2f}x "
                   f"{'met' if ratio <= COLD_RATIO else 'MISSED'}")
    return out


def write(result: dict, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    lines = ["# GPU check", "", "Made by `benchmarks/gpu_check.sh`; raw onnxruntime is "
             "`session.run` with numpy arrays on the same GPU; served goes through onnxserve "
             "(gRPC, dynamic batching, padded to warmed-up buckets) from client processes on "
             "the same machine.", "", "```", *summarise(result), "```", ""]
    served = result.get("served", {})
    if served:
        lines += ["| model | concurrency | served/s | p50 ms | p99 ms | errors |",
                  "|---|---|---|---|---|---|"]
        for name, rows in served.items():
            lines += [f"| {name} | {r['concurrency']} | {r['throughput']:.0f} | "
                      f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |" for r in rows]
        lines.append("")
    if result.get("raw"):
        lines += ["| model | batch | raw/s | p50 ms |", "|---|---|---|---|"]
        for name, rows in result["raw"].items():
            lines += [f"| {name} | {b} | {r['throughput']:.0f} | {r['p50_ms']:.2f} |"
                      for b, r in rows.items()]
    (results_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True,
                        help="unpacked model repository (benchmarks/gpu_models.py)")
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--raw-seconds", type=float, default=1.0)
    parser.add_argument("--window-s", type=float, default=4.0,
                        help="measured seconds per served concurrency (after 1.5 s warm-up)")
    parser.add_argument("--instances", type=int, default=2, help="GPU instances per model")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=list(RAW_MODELS),
                        help="models measured raw and served (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--providers", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of the whole check without a GPU")
    args = parser.parse_args(argv)
    cuda = args.providers == "cuda"
    budget = Budget(args.budget_s)
    result: dict = {"environment": environment(), "skipped": [],
                    "gpu_tests": os.environ.get("GPU_TESTS_RESULT", "")}
    _log(f"environment: {result['environment']}")
    names = sorted(p.name for p in args.repository.iterdir() if p.is_dir())
    if cuda and not result["environment"]["usable_gpus"]:
        result["skipped"].append("everything on the GPU: CUDA is not usable")
        write(result, args.results_dir)
        print("\n".join(summarise(result)))
        return 1
    # parity may take up to a third of the budget; the rest is for throughput
    result["parity"] = parity(args.repository, names, args.providers,
                              Budget(args.budget_s / 3))
    active = {r.get("provider") for r in result["parity"] if "provider" in r}
    result["active_provider"] = ", ".join(sorted(active)) or "none"
    served_names = [n for n in args.models if n in names]
    result["raw"] = {}
    for name in served_names:
        if not budget.allows(60):
            result["skipped"].append(f"raw {name}: out of time")
            continue
        result["raw"][name] = raw(args.repository, name, tuple(args.batches), args.raw_seconds,
                                  providers=args.providers)
    result["prefer_nhwc"] = {}
    for name in ("resnet50_fp16", "resnet50"):
        if not cuda or name not in names or not budget.allows(200):
            continue
        try:
            default = raw(args.repository, name, (1, 32), args.raw_seconds)
            nhwc = raw(args.repository, name, (1, 32), args.raw_seconds, {"prefer_nhwc": "1"})
            result["prefer_nhwc"][name] = {b: nhwc[b]["throughput"] / default[b]["throughput"]
                                           for b in (1, 32)}
        except Exception as exc:
            result["skipped"].append(f"prefer_nhwc {name}: {exc}"[:200])
    result["served"] = {}
    try:
        served(args, served_names, budget, result)
    except Exception as exc:  # keep what was measured before
        result["skipped"].append(f"served: {type(exc).__name__}: {exc}"[:400])
        _log(f"served part failed: {exc}")
    finally:
        result["targets"] = targets(result)
        write(result, args.results_dir)
    print("\n== GPU check summary")
    print("\n".join(summarise(result)))
    return 0


def served(args: argparse.Namespace, names: list[str], budget: Budget, result: dict) -> None:
    """Serve ``names`` (several instances each, dynamic batching, buckets) and measure."""
    import onnxruntime as ort

    args.results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "repository"
        _serving_repository(args.repository, names, repository, args.instances,
                            kind=1 if args.providers == "cuda" else 2,  # KIND_GPU / KIND_CPU
                            largest=max(args.batches))
        load_started = time.monotonic()
        server = start_server(repository, args.results_dir / "gpu_check_server.log",
                              min(300, max(budget.deadline - time.monotonic(), 30)),
                              args.providers)
        result["server_load_seconds"] = round(time.monotonic() - load_started, 1)
        _log(f"server ready in {result['server_load_seconds']} s")
        context = multiprocessing.get_context("spawn")
        try:
            with context.Pool(args.client_processes) as pool:
                for name in names:
                    session = ort.InferenceSession(str(_model_file(args.repository, name)),
                                                   providers=["CPUExecutionProvider"])
                    sample = _sample(session, 1)
                    if name == names[0] and budget.allows(30):
                        result["cold_shapes"] = cold_shapes(server.url, name, sample,
                                                            max(args.batches))
                        _log(f"cold shapes: {result['cold_shapes']}")
                    payload = build_request(name, sample)
                    rows = result["served"][name] = []
                    for concurrency in args.concurrency:
                        if not budget.allows(args.window_s + 5):
                            result["skipped"].append(
                                f"served {name} c={concurrency}: out of time")
                            continue
                        row = served_load(pool, args.client_processes, server.url, payload,
                                          concurrency, args.window_s)
                        _log(f"served {name} c={concurrency}: {row}")
                        rows.append(row)
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
