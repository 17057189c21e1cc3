"""Where a served request's time goes: a profile of the server under closed-loop load.

    python -m onnxserve.benchmarks.profile --model-repository DIR --model lenet5 \
        [--concurrency 16] [--tool py-spy|yappi|stages] [--baseline CHECKOUT]

Starts the server, drives it with the benchmark's load generator in a second process, and
writes <--out>/profile_<model>[_yappi].md (default ./bench_results; ``--out
benchmarks/results`` for the committed one):

- ``py-spy`` (``pip install py-spy``, the default): samples every thread for ``--seconds``;
  own-time and inclusive-time shares. Time inside gRPC's compiled core shows up as its
  Python entry point (asyncio Handle._run).
- ``yappi`` (``pip install yappi``): traces every call of every thread (the server runs
  under it once ready, serving/observability/profiling.py) and reports CPU time per
  thread and the functions with the most own CPU time on the event loop's thread, per
  request; slower than the real server, so read shares, not rates. The server also runs
  with ``--stage-timing``, whose per-request breakdown heads the report.
- ``stages``: no profiler; the server runs with ``--stage-timing`` and the report gives each
  stage's mean microseconds per request and the server's CPU microseconds per request
  (process CPU time over the requests answered), ``--repeat`` times. With ``--baseline
  CHECKOUT`` (another revision's source tree, e.g. from ``git worktree add``) the runs
  alternate between that revision's server and this one's, same client and model, so the
  breakdown before and after a change comes from one run.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onnxserve.export.cpu import this_cpu
from onnxserve.serving.process import ServerProcess

from .bench import DEFAULT_OUT

_LOAD = """
import asyncio, sys, numpy as np
from onnxserve.benchmarks.load import build_request, run_load
from onnxserve.serving.models.repository import read_model
from onnxserve.benchmarks.bench import _sample
config = read_model(__import__("pathlib").Path(sys.argv[2]), sys.argv[3]).config
payload = build_request(sys.argv[3], {config.input[0].name: _sample(config)[None]})
r = asyncio.run(run_load(sys.argv[1], payload, concurrency=int(sys.argv[4]), warmup_s=1,
                         window_s=float(sys.argv[5]), max_windows=1))
print(f"{r.throughput:.0f} inferences/s, p50 {r.p50_ms:.2f} ms")
"""


def summarize(raw: str, top: int = 25) -> tuple[int, list, list]:
    """(samples, own-time shares, inclusive shares) from py-spy's raw (collapsed) output."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = lambda c: [(f, 100 * n / total) for f, n in c.most_common(top)]  # noqa: E731
    return total, share(own), share(inclusive)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                        help="repository the server loads (default %(default)s)")
    parser.add_argument("--model", default="lenet5",
                        help="model to send requests to (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="closed-loop requests in flight meanwhile (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="how long py-spy samples the server (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for profile_<model>.md (default ./%(default)s)")
    parser.add_argument("--tool", choices=("py-spy", "yappi", "stages"), default="py-spy",
                        help="py-spy: sample every thread; yappi: trace every call, per "
                             "thread, with the stage timing; stages: the stage timing and "
                             "server CPU per request alone (default %(default)s)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="--tool stages: also measure the server of this source tree "
                             "(another revision's checkout), alternating with this one")
    parser.add_argument("--repeat", type=int, default=3,
                        help="--tool stages: runs per server (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tool == "yappi":
        return profile_with_yappi(args)
    if args.tool == "stages":
        return stage_breakdown(args)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    server = ServerProcess.serve(args.model_repository, "--log-level", "WARNING")
    try:
        server.wait_ready()
        load = subprocess.Popen(
            [sys.executable, "-c", _LOAD, server.url, str(args.model_repository), args.model,
             str(args.concurrency), str(args.seconds + 2)],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(2)
        with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
            subprocess.run([py_spy, "record", "--pid", str(server.pid), "--duration",
                            str(int(args.seconds)), "--format", "raw", "--output", raw.name,
                            "--threads", "--nonblocking"], check=True, capture_output=True)
            total, own, inclusive = summarize(Path(raw.name).read_text())
        measured = load.communicate(timeout=120)[0].strip()
    finally:
        server.stop()
    lines = [f"# Profile: {args.model} at concurrency {args.concurrency}", "",
             f"`python -m onnxserve.benchmarks.profile --model {args.model} --concurrency "
             f"{args.concurrency}`: py-spy, {total} samples over {args.seconds:.0f} s, "
             f"server threads. Load meanwhile: {measured}.", "",
             "## Own time", "", "| share | function |", "|---|---|"]
    lines += [f"| {p:.1f}% | `{f}` |" for f, p in own]
    lines += ["", "## Inclusive time", "", "| share | function |", "|---|---|"]
    lines += [f"| {p:.1f}% | `{f}` |" for f, p in inclusive]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.model}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({measured})")
    return 0


def _stage_totals(metrics_url: str) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds, count) of each stage, from the server's stage counters."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    seconds: dict[str, float] = {}
    count: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "onnxserve_stage_seconds_total":
                seconds[sample.labels["stage"]] = sample.value
            elif sample.name == "onnxserve_stage_count_total":
                count[sample.labels["stage"]] = sample.value
    return seconds, count


def _stage_means(metrics_url: str) -> dict[str, float]:
    """Mean microseconds per request of each stage, from the server's stage counters."""
    seconds, count = _stage_totals(metrics_url)
    return {stage: 1e6 * seconds[stage] / n for stage, n in count.items() if n}


#: The top-level folders of a checkout that make up the installed onnxserve package.
_PACKAGES = ("serving", "export", "protos", "clients", "benchmarks")


def _package_tree(checkout: Path, folder: Path) -> Path:
    """A folder to put on PYTHONPATH so that ``import onnxserve`` finds ``checkout``'s code:
    ``folder/onnxserve/<package>`` links to each of the checkout's top-level packages."""
    root = folder / "onnxserve"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    for name in _PACKAGES:
        if (checkout / name).is_dir():
            (root / name).symlink_to((checkout / name).resolve())
    return folder


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stage_run(args: argparse.Namespace, env: dict[str, str] | None) -> dict:
    """One server (this code, or another checkout's with ``env``'s PYTHONPATH) under load:
    throughput, stage means (us) and server CPU us per request."""
    from onnxserve.serving.process import free_port, onnxserve_command

    metrics_port = free_port()
    flags = ("--log-level", "WARNING", "--stage-timing")
    if env is None:
        server = ServerProcess.serve(args.model_repository, *flags, metrics_port=metrics_port)
    else:
        # Another revision's server: only the flags every revision with stage timing knows.
        port = free_port()
        server = ServerProcess(onnxserve_command(
            "serve", "--model-repository", str(args.model_repository), "--grpc-host",
            "127.0.0.1", "--grpc-port", str(port), "--metrics-port", str(metrics_port),
            *flags), f"127.0.0.1:{port}", env=env)
    try:
        server.wait_ready()
        cpu = _process_cpu_seconds(server.pid)
        load = subprocess.run(
            [sys.executable, "-c", _LOAD, server.url, str(args.model_repository), args.model,
             str(args.concurrency), str(args.seconds)],
            stdout=subprocess.PIPE, text=True, check=True, timeout=300)
        cpu = _process_cpu_seconds(server.pid) - cpu
        seconds, count = _stage_totals(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        server.stop(timeout=60)
    requests = count.get("handler", 0)
    return {"load": load.stdout.strip(),
            "throughput": float(load.stdout.split()[0]),
            "stages": {s: 1e6 * seconds[s] / n for s, n in count.items() if n},
            "cpu_us": 1e6 * cpu / requests if requests else float("nan")}


def _revision(checkout: Path, label: str) -> str:
    """``label`` with the checkout's git commit (and "+ changes" when its tree differs)."""
    def git(*command: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *command], capture_output=True,
                              text=True, timeout=30).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return label
    changed = git("status", "--porcelain", "--untracked-files=no")
    return f"{label} ({commit}{' + changes' if changed else ''})"


def stage_breakdown(args: argparse.Namespace) -> int:
    """The stage report (see the module docstring); returns the exit status."""
    here = Path(__file__).resolve().parent.parent
    servers: list[tuple[str, dict[str, str] | None]] = [(_revision(here, "this revision"),
                                                          None)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline is not None:
            if not (args.baseline / "serving").is_dir():
                print(f"profile: --baseline {args.baseline} is not an onnxserve checkout (no "
                      "serving/ folder)", file=sys.stderr)
                return 2
            tree = _package_tree(args.baseline, Path(tmp) / "baseline")
            servers.insert(0, (_revision(args.baseline, "baseline"), {"PYTHONPATH": str(tree)}))
        runs: dict[str, list[dict]] = {label: [] for label, _ in servers}
        for attempt in range(args.repeat):
            for label, env in servers:
                run = _stage_run(args, env)
                runs[label].append(run)
                print(f"[{attempt + 1}/{args.repeat}] {label}: {run['load']}, server CPU "
                      f"{run['cpu_us']:.0f} us per request", flush=True)
    stages = list(dict.fromkeys(s for rows in runs.values() for r in rows for s in r["stages"]))

    def median(label: str, pick) -> str:
        values = [v for v in (pick(r) for r in runs[label]) if v is not None]
        return f"{statistics.median(values):.1f}" if values else ""

    labels = [label for label, _ in servers]
    lines = [f"# Stage timing: {args.model} at concurrency {args.concurrency}", "",
             f"`python -m onnxserve.benchmarks.profile --tool stages --model {args.model} "
             f"--concurrency {args.concurrency} --seconds {args.seconds:g} --repeat "
             f"{args.repeat}" + (" --baseline CHECKOUT" if args.baseline else "") + "` on "
             f"{this_cpu()}; client and server share the machine. Medians of {args.repeat} "
             "runs per server" + (", alternating" if args.baseline else "") + "; each stage "
             "in microseconds per request (mean over the run's requests).", "",
             "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
             "| inferences/s | " + " | ".join(median(x, lambda r: r["throughput"])
                                              for x in labels) + " |",
             "| server CPU us per request | " + " | ".join(
                 median(x, lambda r: r["cpu_us"]) for x in labels) + " |"]
    lines += [f"| {stage} | " + " | ".join(median(x, lambda r, s=stage: r["stages"].get(s))
                                          for x in labels) + " |" for stage in stages]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"stages_{args.model}_c{args.concurrency}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


def profile_with_yappi(args: argparse.Namespace) -> int:
    """The yappi report (see the module docstring); returns the exit status."""
    import importlib.util
    import pstats

    from onnxserve.serving.observability.profiling import ENVIRONMENT
    from onnxserve.serving.process import free_port

    if importlib.util.find_spec("yappi") is None:
        print("profile: yappi is not installed (pip install yappi)", file=sys.stderr)
        return 2
    metrics_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "server.pstat"
        server = ServerProcess.serve(args.model_repository, "--log-level", "WARNING",
                                     "--stage-timing", metrics_port=metrics_port,
                                     env={ENVIRONMENT: str(stats_path)})
        try:
            server.wait_ready()
            load = subprocess.run(
                [sys.executable, "-c", _LOAD, server.url, str(args.model_repository),
                 args.model, str(args.concurrency), str(args.seconds)],
                stdout=subprocess.PIPE, text=True, check=True, timeout=300)
            measured = load.stdout.strip()
            means = _stage_means(f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            server.stop(timeout=60)
        if not stats_path.exists():
            print(f"profile: the server wrote no profile:\n{server.output()[-2000:]}",
                  file=sys.stderr)
            return 1
        threads = Path(f"{stats_path}.threads.txt").read_text().strip().splitlines()
        stats = pstats.Stats(str(stats_path))
        requests = max(1, _requests(stats))
        rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:30]
    lines = [f"# Profile (yappi): {args.model} at concurrency {args.concurrency}", "",
             f"`python -m onnxserve.benchmarks.profile --tool yappi --model {args.model} "
             f"--concurrency {args.concurrency} --seconds {args.seconds:g}`. Load meanwhile "
             f"(under the tracing profiler, so slower than the real server): {measured}.", "",
             "## Stage timing (mean per request, --stage-timing)", "",
             "| stage | us |", "|---|---|"]
    lines += [f"| {stage} | {us:.1f} |" for stage, us in means.items()]
    lines += ["", "## CPU per thread", "", *[f"- {t}" for t in threads], "",
              "## Own CPU time, every thread", "",
              "| own s | us per request | calls | function |", "|---|---|---|---|"]
    for (filename, line, name), (_cc, calls, own, _cum, _callers) in rows:
        where = f"{Path(filename).name}:{line}"
        lines.append(f"| {own:.3f} | {1e6 * own / requests:.1f} | {calls} | "
                     f"`{name} ({where})` |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.model}_yappi.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({measured})")
    return 0


def _requests(stats) -> int:
    """ModelInfer calls in the profile (the handler's call count)."""
    return max((calls for (_f, _l, name), (_cc, calls, *_rest) in stats.stats.items()
                if name.endswith("ModelInfer")), default=1)


if __name__ == "__main__":
    sys.exit(main())
