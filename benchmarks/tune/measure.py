"""Serving one configuration and measuring it against the latency budget.

Each configuration is served by its own `onnxserve serve` process over a temporary
repository holding the model with the candidate's config.pbtxt (the version folders linked,
not copied). With a fixed --concurrency or --request-rate it is measured at that load;
otherwise its load is swept, as Triton's Model Analyzer sweeps concurrency: from a starting
concurrency (1, or the best one found so far) doubling while p99 stays within the budget and
throughput still grows (by PLATEAU at least), halving when even the start breaks the budget,
then one step of bisection between the last concurrency within the budget and the first
beyond it. A configuration's figure is its best load within the budget (highest throughput;
with a fixed --request-rate, lowest p99).

The measuring client is perf_analyzer (benchmarks/perf_analyzer.py) or the project's own
load generator (benchmarks/load.py); each load warms up (the Python client) and measures
windows until three agree within 10%, as both do in `onnxserve bench`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.protobuf import text_format

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.serving.process import ServerProcess
from onnxserve.serving.settings import setting_env_names

from ..bench import tree_cpu_seconds
from ..load import build_request, run_load
from ..perf_analyzer import (
    PerfAnalyzer,
    PerfAnalyzerFailed,
    PerfAnalyzerMissing,
    run_perf_analyzer,
)
from .candidates import Candidate
from .variants import ModelVariant

#: A doubled load must add this share of throughput to count as progress; beyond the
#: plateau more requests in flight only queue.
PLATEAU = 0.03
#: With a fixed --request-rate, a configuration keeps up when it answers this share of it.
KEEPS_UP = 0.95
#: Seconds a configuration's server has to load and warm its model up.
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Objective:
    """What tune optimises: the p99 budget, at a fixed load or the best load within it."""

    p99_ms: float
    #: closed loop at this many requests in flight (None: swept, unless ``rate``)
    concurrency: int | None = None
    #: Poisson arrivals at this many requests/s
    rate: float | None = None
    #: the highest concurrency a sweep goes to
    max_concurrency: int = 256

    def meets(self, point: Point) -> bool:
        """Whether ``point`` is within the budget: no errors, p99 within it, and keeping up
        with a fixed rate."""
        if point.errors or not point.p99_ms <= self.p99_ms:
            return False
        return self.rate is None or point.throughput >= KEEPS_UP * self.rate

    def better(self, a: Point, b: Point) -> bool:
        """Whether ``a`` is a better point than ``b`` (both within the budget)."""
        if self.rate is not None:
            return a.p99_ms < b.p99_ms
        return a.throughput > b.throughput

    def score(self, point: Point | None) -> float:
        """A point's figure, higher is better: inferences/s, or with a fixed rate, 1000 / p99
        ms (0: no point within the budget)."""
        if point is None:
            return 0.0
        return 1000.0 / point.p99_ms if self.rate is not None else point.throughput

    def describe(self) -> str:
        if self.rate is not None:
            load = f"Poisson arrivals at {self.rate:g} requests/s"
        elif self.concurrency is not None:
            load = f"{self.concurrency} request(s) in flight"
        else:
            load = f"the best load within the budget (concurrency 1 to {self.max_concurrency})"
        return f"p99 <= {self.p99_ms:g} ms at {load}"


@dataclass
class Point:
    """One load measured on one configuration; throughput in inferences/s, times in ms."""

    concurrency: int
    rate: float | None
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    stable: bool
    server_cpu_percent: float
    client_cpu_percent: float
    #: samples per execution the server ran (None: not known, e.g. several workers)
    mean_batch: float | None = None
    meets: bool = False

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Trial:
    """One configuration served and measured (``run``: 0 in the search, 1, 2, ... when the
    confirmation measures it again)."""

    number: int
    candidate: Candidate
    #: why it was measured: ``default``, ``predicted``, the knob varied, or ``confirm``
    phase: str
    points: list[Point] = field(default_factory=list)
    seconds: float = 0.0
    #: of ``seconds``, those its server took to start and load the model
    start_seconds: float = 0.0
    #: why it has no figures (its server did not start, the client failed)
    failure: str | None = None
    run: int = 0

    def best(self, objective: Objective) -> Point | None:
        """Its best point within the budget (None: none is)."""
        best = None
        for point in self.points:
            if point.meets and (best is None or objective.better(point, best)):
                best = point
        return best

    def score(self, objective: Objective) -> float:
        return objective.score(self.best(objective))

    def as_dict(self, objective: Objective) -> dict:
        best = self.best(objective)
        return {"number": self.number, "run": self.run, "phase": self.phase,
                "candidate": asdict(self.candidate),
                "describe": self.candidate.describe(), "seconds": round(self.seconds, 1),
                "start_seconds": round(self.start_seconds, 1), "failure": self.failure,
                "points": [p.as_dict() for p in self.points],
                "best": None if best is None else best.as_dict()}


@dataclass
class LoadClient:
    """How loads are generated: ``kind`` perf_analyzer (with its ``analyzer``) or python;
    each load warms up ``warmup_s`` (python) and measures windows of ``window_s`` s, 3 to
    ``max_windows``."""

    kind: str
    window_s: float
    max_windows: int
    warmup_s: float
    analyzer: PerfAnalyzer | None = None

    def point_seconds(self) -> float:
        """The most one load's measurement takes (perf_analyzer: three more windows when
        unstable, and its start)."""
        if self.kind == "python":
            return self.warmup_s + self.max_windows * self.window_s
        return (max(3, self.max_windows) + 3) * self.window_s + 1.0


class Measurer:
    """Serves and measures candidates of the models in ``variants`` (by name) from
    ``repository``, numbering the trials; ``log`` prints progress."""

    def __init__(self, repository: Path, variants: dict[str, ModelVariant],
                 objective: Objective, client: LoadClient,
                 log: Callable[[str], None] = print) -> None:
        self.repository = repository
        self.variants = variants
        self.objective = objective
        self.client = client
        self.log = log
        self.trials: list[Trial] = []
        #: stop sweeping loads after this time.monotonic() (None: no limit)
        self.deadline: float | None = None

    def measure(self, candidate: Candidate, phase: str, *, start_concurrency: int = 1,
                fixed: Point | None = None, run: int = 0) -> Trial:
        """Serve ``candidate`` and measure it: at the objective's fixed load, sweeping the
        concurrency from ``start_concurrency``, or for a confirmation at ``fixed``'s load
        (where that breaks the budget this time, going down as a sweep does)."""
        trial = Trial(len(self.trials) + 1, candidate, phase, run=run)
        self.trials.append(trial)
        started = time.monotonic()
        variant = self.variants[candidate.model]
        with tempfile.TemporaryDirectory(prefix="onnxserve-tune-") as tmp:
            repository = Path(tmp)
            self._stage(variant, candidate, repository)
            # every flag the candidate depends on given, none of this shell's ONNXSERVE_*
            # settings inherited: the server runs what the report will say
            server = ServerProcess.serve(
                repository, "--log-level", "WARNING", "--workers", str(candidate.workers),
                *(["--grpc-transport", candidate.grpc_transport]
                  if candidate.grpc_transport else []),
                drop_env=setting_env_names())
            try:
                try:
                    server.wait_ready(self._start_timeout())
                except RuntimeError as exc:
                    trial.failure = f"the server did not start: {_why_not_ready(str(exc))}"
                    self.log(f"  {trial.failure}")
                    return trial
                trial.start_seconds = time.monotonic() - started
                measure = _PointMeasure(self, server, variant, candidate.workers)
                swept = self.objective.rate is None and self.objective.concurrency is None
                if fixed is not None and swept:
                    self._sweep(measure, fixed.concurrency, upward=False)
                elif fixed is not None:
                    measure.at(fixed.concurrency, fixed.rate)
                elif self.objective.rate is not None:
                    measure.at(1, self.objective.rate)
                elif self.objective.concurrency is not None:
                    measure.at(self.objective.concurrency)
                else:
                    self._sweep(measure, start_concurrency)
                trial.points = measure.points
                trial.failure = measure.failure
            finally:
                server.stop()
                trial.seconds = time.monotonic() - started
        return trial

    def _start_timeout(self) -> float:
        """Seconds a server may take to start: START_TIMEOUT_S, less where the deadline is
        nearer (at least 30)."""
        if self.deadline is None:
            return START_TIMEOUT_S
        return max(30.0, min(START_TIMEOUT_S, self.deadline - time.monotonic() + 30.0))

    def _sweep(self, measure: _PointMeasure, start: int, upward: bool = True) -> None:
        """Sweep the load from ``start`` (module docstring); without ``upward``, a load
        within the budget at ``start`` ends it (a confirmation: only when ``start`` breaks
        the budget this time are lower loads measured)."""
        objective = self.objective
        c = max(1, min(start, objective.max_concurrency))
        point = measure.at(c)
        within: int | None = c if point is not None and point.meets else None
        beyond: int | None = None
        if within is None:
            beyond = c
            while c > 1 and measure.usable():
                c //= 2
                point = measure.at(c)
                if point is not None and point.meets:
                    within = c
                    break
                beyond = c
        elif upward:
            best = point
            while c * 2 <= objective.max_concurrency and measure.usable():
                point = measure.at(c * 2)
                if point is None or not point.meets:
                    beyond = c * 2
                    break
                c *= 2
                within = c
                assert best is not None
                if point.throughput < best.throughput * (1 + PLATEAU):
                    break
                best = point
        if within is not None and beyond is not None and abs(beyond - within) > 1 \
                and measure.usable():
            measure.at((within + beyond) // 2)

    def _stage(self, variant: ModelVariant, candidate: Candidate, repository: Path) -> None:
        """``repository``/<model> holding the model's files with the candidate's config:
        its version folders (and other folders) linked, its other files copied."""
        source = variant.model_file.parent.parent
        target = repository / variant.name
        target.mkdir()
        for entry in source.iterdir():
            if entry.name == "config.pbtxt":
                continue
            if entry.is_dir():
                (target / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
            else:
                shutil.copy2(entry, target / entry.name)
        config = candidate.apply(variant.config)
        (target / "config.pbtxt").write_text(text_format.MessageToString(config))


class _PointMeasure:
    """Measures loads on one running server, keeping every point."""

    def __init__(self, measurer: Measurer, server: ServerProcess, variant: ModelVariant,
                 workers: int) -> None:
        self.m = measurer
        self.server = server
        self.variant = variant
        self.workers = workers
        #: ModelStatistics add up in one process only (each worker counts its own)
        self.statistics = workers == 1
        batched = variant.config.max_batch_size > 0
        self.payload = build_request(variant.name, {
            n: x[None] if batched else x for n, x in variant.inputs.items()})
        self.points: list[Point] = []
        self.failure: str | None = None

    def usable(self) -> bool:
        """Whether another load may be measured: no failure, before the deadline."""
        deadline = self.m.deadline
        return self.failure is None and (deadline is None or time.monotonic() < deadline)

    def at(self, concurrency: int, rate: float | None = None) -> Point | None:
        client = self.m.client
        load = f"{rate:g} requests/s" if rate is not None else f"concurrency {concurrency}"
        before = self._counts()
        cpu0, t0 = tree_cpu_seconds(self.server.pid), time.perf_counter()
        try:
            if client.kind == "python":
                # connections enough for every worker to receive some (the kernel spreads
                # connections, not requests, across the processes sharing the port)
                connections = max(4 if rate is not None else min(concurrency, 4),
                                  2 * self.workers)
                result = asyncio.run(run_load(
                    self.server.url, self.payload, concurrency=concurrency, rate=rate,
                    warmup_s=client.warmup_s, window_s=client.window_s,
                    max_windows=client.max_windows, connections=connections))
            else:
                assert client.analyzer is not None
                result = run_perf_analyzer(
                    client.analyzer, self.server.url, self.variant.name,
                    concurrency=concurrency, rate=rate, inputs=self.variant.inputs,
                    window_s=client.window_s, max_windows=client.max_windows)
        except (PerfAnalyzerFailed, PerfAnalyzerMissing) as exc:
            self.failure = f"perf_analyzer failed at {load}: {exc}"
            self.m.log(f"  {self.failure}")
            return None
        server_cpu = 100 * (tree_cpu_seconds(self.server.pid) - cpu0) / (
            time.perf_counter() - t0)
        after = self._counts()
        mean_batch = None
        if before is not None and after is not None and after[1] > before[1]:
            mean_batch = (after[0] - before[0]) / (after[1] - before[1])
        point = Point(concurrency=concurrency, rate=rate, throughput=result.throughput,
                      p50_ms=result.p50_ms, p95_ms=result.p95_ms, p99_ms=result.p99_ms,
                      errors=result.errors, stable=result.stable,
                      server_cpu_percent=server_cpu,
                      client_cpu_percent=result.client_cpu_percent, mean_batch=mean_batch)
        point.meets = self.m.objective.meets(point)
        self.points.append(point)
        self.m.log(f"  {load}: {point.throughput:.0f}/s p50 {point.p50_ms:.2f} ms p99 "
                   f"{point.p99_ms:.2f} ms" + (f" errors {point.errors}" if point.errors else "")
                   + ("" if point.meets else " (over the budget)")
                   + ("" if point.stable else " (unstable)"))
        return point

    def _counts(self) -> tuple[int, int] | None:
        """(inferences, executions) so far from ModelStatistics (one worker only: each
        worker counts its own)."""
        if not self.statistics:
            return None
        try:
            with Client(self.server.url, timeout=5.0) as c:
                stats = c.statistics(self.variant.name)[0]
        except (InferenceServerError, IndexError, KeyError):
            return None
        return stats["inference_count"], stats["execution_count"]


def _why_not_ready(text: str, limit: int = 400) -> str:
    """The line of a failed start that says why (a model's load error), else its first."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = next((line for line in lines if "failed to load" in line), lines[0] if lines else "")
    return line if len(line) <= limit else line[:limit - 3] + "..."
