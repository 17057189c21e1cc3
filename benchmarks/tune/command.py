"""`onnxserve tune MODEL --latency-budget-ms P99`: the command, in its phases (costs,
search, confirm, report; see benchmarks/tune/__init__.py), within --max-minutes."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from google.protobuf import text_format

from onnxserve.export.cpu import this_cpu
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.errors import ModelLoadError

from ..bench import bounded
from ..perf_analyzer import PerfAnalyzerFailed, PerfAnalyzerMissing, find_perf_analyzer
from . import TuneError
from .candidates import Candidate
from .costs import RawProfile, TransportCost, profile_raw, transport_cost
from .decide import Decision, Finalist, decide, pareto_front
from .measure import LoadClient, Measurer, Objective, Trial
from .report import write_report
from .search import batch_sizes, neighbours, predictions, thread_counts
from .variants import ModelVariant, find_variants

#: Where results go by default (never into the repository without --apply).
DEFAULT_OUT = Path("tune_results")
DEFAULT_MAX_MINUTES = 15.0
#: Configurations served from the prediction, besides the model's own.
PREDICTED_SERVED = 3
#: Configurations of the search that go on to the confirmation, besides the model's own.
FINALISTS = 2
#: A knob's value replaces the best when it measures this share better (the confirmation
#: then judges with the measured spread).
SEARCH_MARGIN = 0.03
#: Seconds each raw onnxruntime point runs (at least 5 runs).
RAW_SECONDS = 0.4

DESCRIPTION = (
    "Find the configuration of one repository model that serves the most inferences/s while "
    "p99 stays within --latency-budget-ms, measured on this machine: raw onnxruntime per "
    "batch size and thread count and a do-nothing server first (to prune), then the "
    "predicted best configurations and one knob at a time around the best (instances and "
    "threads, preferred batch size, max queue delay, spinning, event loop, workers, gRPC "
    "transport, the model's int8/fp16 variants), each served and its load swept (or at "
    "--concurrency / --request-rate), then the finalists again in turns for the run-to-run "
    "spread. Writes tune.md, tune.json, tune.png and the chosen config.pbtxt under --out; "
    "--apply also writes that config into the repository."
)


def add_tune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="the fastest configuration of a model within a p99 "
                                           "latency budget, measured here",
                              description=DESCRIPTION)
    p.add_argument("model", help="the repository model to tune")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--latency-budget-ms", type=bounded(float, 0, False, "ms"),
                        help="the p99 latency each configuration must stay within (ms)")
    budget.add_argument("--latency-budget-x", type=bounded(float, 0, False),
                        metavar="FACTOR",
                        help="the p99 budget as a multiple of the model's batch-1 latency "
                             "(raw onnxruntime's p50 with the threads the model's own "
                             "configuration gets), measured first")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=bounded(int, 1, True),
                      help="measure at this many requests in flight (closed loop); default: "
                           "each configuration's load is swept for its best within the "
                           "budget")
    load.add_argument("--request-rate", type=bounded(float, 0, False, "requests/s"),
                      help="measure at Poisson arrivals of this many requests/s; the "
                           "configuration with the lowest p99 that keeps up wins")
    p.add_argument("--max-minutes", type=bounded(float, 0, False, "minutes"),
                   default=DEFAULT_MAX_MINUTES,
                   help="stop measuring after this long, reporting what was measured "
                        "(default %(default)g)")
    p.add_argument("--max-concurrency", type=bounded(int, 1, True), default=256,
                   help="the highest concurrency a load sweep goes to (default %(default)s)")
    p.add_argument("--client", choices=("auto", "perf_analyzer", "python"), default="auto",
                   help="load generator: perf_analyzer where one is found (no download), else "
                        "the project's Python client (auto, the default), or either one")
    p.add_argument("--perf-analyzer", type=Path, metavar="PATH",
                   help="the perf_analyzer binary (default: $ONNXSERVE_PERF_ANALYZER, else the "
                        "one onnxserve bench fetched)")
    p.add_argument("--no-variants", action="store_true",
                   help="leave the model's _int8/_fp16 variants out")
    p.add_argument("--window", type=bounded(float, 0, False, "seconds"), default=2.0,
                   help="seconds per measurement window; a load is measured until three "
                        "windows agree within 10%% (default %(default)g)")
    p.add_argument("--max-windows", type=bounded(int, 3, True), default=5,
                   help="most windows per load (default %(default)s)")
    p.add_argument("--warmup", type=bounded(float, 0, True, "seconds"), default=1.0,
                   help="seconds of load before the Python client measures (default "
                        "%(default)g)")
    p.add_argument("--runs", type=bounded(int, 2, True), default=3,
                   help="runs of each finalist, the search's included, for the run-to-run "
                        "spread (default %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="folder for tune.md, tune.json, tune.png and <model>/config.pbtxt "
                        "(default ./%(default)s)")
    p.add_argument("--apply", action="store_true",
                   help="also write the chosen config.pbtxt into the repository (the one it "
                        "replaces is kept under --out as config.pbtxt.before)")
    p.set_defaults(func=run_tune)
    return p  # the caller adds --model-repository (a setting of the server's)


class Clock:
    """The run's time: --max-minutes from the start."""

    def __init__(self, max_minutes: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + max_minutes * 60

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.started


def _say(line: str) -> None:
    print(line, flush=True)


def _client(args) -> LoadClient:
    client = LoadClient("python", args.window, args.max_windows, args.warmup)
    if args.client == "python":
        return client
    try:
        analyzer = find_perf_analyzer(args.perf_analyzer, fetch=False)
        version = analyzer.version()
    except (PerfAnalyzerMissing, PerfAnalyzerFailed) as exc:
        if args.client == "perf_analyzer":
            raise TuneError(f"--client perf_analyzer: {exc}") from None
        _say(f"client: the Python load generator (no perf_analyzer: {str(exc)[:200]})")
        return client
    _say(f"client: perf_analyzer {analyzer.binary} ({version})")
    return replace(client, kind="perf_analyzer", analyzer=analyzer)


def _transports() -> tuple[str, ...]:
    """The gRPC transports the server can run, its default first."""
    from onnxserve.serving.frontends import native

    return ("native", "python") if native.transport is not None else ("python",)


class Tuner:
    """One run of `onnxserve tune`, phase by phase."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repository: Path = args.model_repository
        self.objective = Objective(args.latency_budget_ms or 0.0, args.concurrency,
                                   args.request_rate, args.max_concurrency)
        self.clock = Clock(args.max_minutes)
        self.cores = os.cpu_count() or 1
        self.variants: list[ModelVariant] = []
        self.profiles: dict[str, RawProfile] = {}
        self.cost: TransportCost | None = None
        self.predicted: list = []
        self.not_measured: list[str] = []
        self.finalists: list[Finalist] = []
        self.decision: Decision | None = None
        #: the choice among the model's own precision when a variant is chosen
        self.own_decision: Decision | None = None
        #: the model's own configuration (read in the costs phase)
        self.default = Candidate(model=args.model)
        self.client = _client(args)
        self.measurer: Measurer | None = None
        #: what stopped the search or the confirmation early (None: nothing)
        self.error: str | None = None
        #: the code measuring: the checkout's revision when it started
        self.revision = _revision()

    # phase 1
    def costs(self) -> None:
        args = self.args
        self.variants = find_variants(self.repository, args.model,
                                      variants=not args.no_variants)
        for v in self.variants[1:]:
            _say(f"variant {v.name} ({v.variant}): " + (
                f"not a candidate: {v.refused}" if v.refused else
                f"agreement with fp32 {v.agreement.describe() if v.agreement else '?'}"))
        try:
            self.default = Candidate.from_config(self.variants[0].config)
        except ModelLoadError as exc:
            raise TuneError(str(exc)) from None
        # and the threads the model's own configuration gets, if not among those
        own_threads = self.default.threads(self.cores)
        threads = sorted({*thread_counts(self.cores), own_threads})
        for v in self.variants:
            if v.refused:
                continue
            sizes = batch_sizes(v.config.max_batch_size)
            _say(f"[costs] raw onnxruntime, {v.name}: batch {', '.join(map(str, sizes))} x "
                 f"{', '.join(map(str, threads))} thread(s)")
            self.profiles[v.name] = profile_raw(v.name, v.model_file, v.inputs, sizes,
                                                threads, RAW_SECONDS,
                                                batched=v.config.max_batch_size > 0)
            for t in threads:
                _say("  " + f"{t} thread(s): " + ", ".join(
                    f"b{b} {self.profiles[v.name].latencies_ms[t, b]:.3f} ms" for b in sizes))
        base = self.variants[0]
        if args.latency_budget_x is not None:
            one = self.profiles[base.name].latency_ms(own_threads, 1)
            self.objective = replace(self.objective, p99_ms=round(args.latency_budget_x * one,
                                                                  3))
            _say(f"budget: {args.latency_budget_x:g} x {one:.3f} ms (batch 1, {own_threads} "
                 f"thread(s)) = {self.objective.p99_ms:g} ms")
        _say("[costs] do-nothing server")
        self.cost = transport_cost(base.config, base.inputs, min(args.window, 1.0))
        _say(f"  round trip {self.cost.round_trip_ms:.3f} ms, "
             f"{self.cost.requests_per_s:.0f} requests/s")

    # phase 2
    def search(self) -> None:
        assert self.cost is not None
        by_name = {v.name: v for v in self.variants if v.refused is None}
        self.measurer = Measurer(self.repository, by_name, self.objective, self.client,
                                 log=_say)
        self.measurer.deadline = self.clock.deadline
        _say(f"[search] the model's own configuration: {self.default.describe(self.cores)}")
        self._measure(self.default, "default", reserve=False)
        self.predicted = predictions(list(by_name.values()), self.profiles, self.cost,
                                     self.objective, self.cores)
        # the best predicted of each variant first, then the next best, PREDICTED_SERVED
        # in all (at least one per variant)
        viable = [p for p in self.predicted if p.viable]
        firsts = [next(p for p in viable if p.candidate.model == name)
                  for name in dict.fromkeys(p.candidate.model for p in viable)]
        queue: list = []
        for prediction in [*firsts, *viable]:
            if prediction in queue or len(queue) >= max(PREDICTED_SERVED, len(firsts)):
                continue
            if self._seen(prediction.candidate, [q.candidate for q in queue]):
                if prediction.candidate.effective(self.cores) == self.default.effective(
                        self.cores):
                    prediction.note += "; the model's own configuration, measured first"
                continue
            queue.append(prediction)
        for i, prediction in enumerate(queue):
            if not self._measure(prediction.candidate, "predicted",
                                 where=f"predicted {i + 1} of {len(queue)}"):
                self.not_measured += [p.candidate.describe(self.cores) for p in queue[i:]]
                return
            prediction.served = True
        # one knob at a time around the best, then (time permitting) around the best of
        # each other variant: the model's own precision gets its best configuration too
        climbed: set[str] = set()
        while True:
            starts = [t for name in by_name if name not in climbed
                      and (t := self._best_trial(name)) is not None]
            if not starts:
                if not climbed:
                    _say("[search] nothing met the budget: no knob to vary around")
                return
            model = max(starts, key=lambda t: t.score(self.objective)).candidate.model
            climbed.add(model)
            if not self._climb(by_name[model]):
                return

    def _climb(self, variant: ModelVariant) -> bool:
        """Vary one knob at a time around ``variant``'s best configuration, adopting a value
        that measures better by SEARCH_MARGIN; False when --max-minutes stopped it."""
        assert self.cost is not None
        transports = _transports()
        done_knobs: set[str] = set()
        while True:
            best = self._best_trial(variant.name)
            assert best is not None  # the climb starts from a configuration that scored
            groups = [(k, vs) for k, vs in neighbours(
                best.candidate, variant, self.profiles[variant.name], self.cost,
                self.objective, self.cores, transports) if k not in done_knobs]
            if not groups:
                return True
            knob, values = groups[0]
            done_knobs.add(knob)
            start = best.best(self.objective)
            assert start is not None
            for value in values:
                if self._seen(value, []):
                    continue
                if not self._measure(value, knob, start_concurrency=start.concurrency,
                                     where=f"{variant.name}: {knob}, {len(groups) - 1} "
                                           "knob(s) after it"):
                    self.not_measured += [c.describe(self.cores) for _, vs in groups
                                          for c in vs if not self._seen(c, [])]
                    return False

    # phase 3
    def confirm(self) -> None:
        assert self.measurer is not None
        self.measurer.deadline = self.clock.deadline  # the search's reserve is for this
        self._select_finalists()
        # the model's own configuration first in each round: the one every other is judged
        # against keeps its runs if the time runs out mid-round
        order = [self.finalists[-1], *self.finalists[:-1]]
        for run in range(1, self.args.runs):
            for finalist in order:
                first = finalist.trials[0]
                fixed = first.best(self.objective) or (first.points[0] if first.points
                                                       else None)
                if fixed is None:
                    continue  # it never served: nothing to repeat
                if self.clock.left() < self._trial_seconds(1):
                    _say("[confirm] --max-minutes reached: the spread comes from the runs "
                         "measured so far")
                    return
                self._progress("confirm", f"run {run + 1} of {self.args.runs}",
                               finalist.candidate)
                finalist.trials.append(self.measurer.measure(
                    finalist.candidate, "confirm", fixed=fixed, run=run))

    def _select_finalists(self) -> None:
        """The two best configurations, the best in the model's own precision and the
        model's own configuration (last), each with the trials measured so far."""
        assert self.measurer is not None
        runs: dict[Candidate, list[Trial]] = {}
        for trial in self.measurer.trials:
            runs.setdefault(trial.candidate.effective(self.cores), []).append(trial)
        default_key = self.default.effective(self.cores)
        ranked = [k for k in sorted(runs, key=lambda k: -runs[k][0].score(self.objective))
                  if k != default_key and runs[k][0].score(self.objective) > 0]
        keys = ranked[:FINALISTS]
        # the best in the model's own precision too, for the choice without variants
        own = [k for k in ranked if k.model == self.default.model]
        if own and own[0] not in keys:
            keys.append(own[0])
        keys.append(default_key)
        self.finalists = [Finalist(runs[k][0].candidate, list(runs[k])) for k in keys]

    # phase 4
    def report(self) -> int:
        assert self.measurer is not None
        if not self.finalists:  # stopped before the confirmation
            self._select_finalists()
        default = next(f for f in self.finalists
                       if f.candidate.effective(self.cores) == self.default.effective(
                           self.cores))
        unit = "1000/p99 ms" if self.objective.rate is not None else "inferences/s"
        self.decision = decide(self.finalists, default, self.objective, unit)
        chosen = self.decision.chosen
        if chosen is not None and chosen.model != self.default.model:
            self.own_decision = decide(
                [f for f in self.finalists if f.candidate.model == self.default.model],
                default, self.objective, unit)
        args = self.args
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        config_path = applied = None
        if chosen is not None:
            variant = next(v for v in self.variants if v.name == chosen.model)
            config_path, applied = write_config(
                chosen, variant.config, out, self.repository,
                apply=args.apply and self.decision.beats_default)
            if applied is not None:
                _say(f"applied: wrote {applied} (the one it replaced: "
                     f"{config_path.with_name('config.pbtxt.before')})")
            elif args.apply:
                _say(f"--apply: nothing written into {self.repository}: the model's own "
                     "configuration is kept")
        own = self.own_decision.chosen if self.own_decision is not None else None
        if own is not None:  # the variant's answers differ: the best without it, beside it
            own_path, _ = write_config(own, self.variants[0].config, out, self.repository,
                                       apply=False)
            _say(f"without the variants: {self.own_decision.reason} ({own_path})")
        result = self._result(config_path, applied is not None)
        written = write_report(result, out)
        _say(f"chosen: {self.decision.reason}")
        for path in written:
            _say(f"wrote {path}")
        return 0 if chosen is not None else 1

    # helpers
    def _seen(self, candidate: Candidate, queued: list[Candidate]) -> bool:
        key = candidate.effective(self.cores)
        measured = [] if self.measurer is None else [t.candidate for t in self.measurer.trials]
        return any(c.effective(self.cores) == key for c in [*measured, *queued])

    def _best_trial(self, model: str | None = None) -> Trial | None:
        """The best trial that met the budget (of ``model`` only, when given)."""
        assert self.measurer is not None
        scored = [t for t in self.measurer.trials if t.score(self.objective) > 0
                  and model in (None, t.candidate.model)]
        best = None
        for t in scored:  # the first measured wins unless beaten by the margin
            if best is None or t.score(self.objective) > best.score(self.objective) * (
                    1 + SEARCH_MARGIN):
                best = t
        return best

    def _trial_seconds(self, points: int | None = None) -> float:
        """Expected seconds of one more trial: its start (as measured so far) and its
        points (``points``, else as many as the trials so far measured on average)."""
        assert self.measurer is not None
        trials = [t for t in self.measurer.trials if t.points]
        start = (sum(t.start_seconds for t in trials) / len(trials)) if trials else 10.0
        if points is None:
            points = round(sum(len(t.points) for t in trials) / len(trials)) if trials else 3
        per_point = (sum(t.seconds - t.start_seconds for t in trials)
                     / max(1, sum(len(t.points) for t in trials))) if trials else (
            self.client.point_seconds())
        return start + points * per_point

    def _confirm_reserve(self) -> float:
        finalists = FINALISTS + 1 + (len(self.profiles) > 1)
        return (self.args.runs - 1) * finalists * self._trial_seconds(1)

    def _measure(self, candidate: Candidate, phase: str, *, reserve: bool = True,
                 start_concurrency: int = 1, where: str | None = None) -> bool:
        """Measure ``candidate`` if the time left allows it (keeping the confirmation's
        share unless ``reserve`` is false), announcing it with ``where`` it stands in the
        search; False when the time does not allow it."""
        assert self.measurer is not None
        need = self._trial_seconds() + (self._confirm_reserve() if reserve else 0)
        if reserve and self.clock.left() < need:
            _say(f"[search] --max-minutes: {self.clock.left():.0f} s left, a configuration "
                 f"takes about {self._trial_seconds():.0f} s and the confirmation "
                 f"{self._confirm_reserve():.0f} s: stopping the search")
            return False
        if where is not None:
            self._progress("search", where, candidate)
        self.measurer.deadline = self.clock.deadline - (
            self._confirm_reserve() if reserve else 0)
        self.measurer.measure(candidate, phase, start_concurrency=start_concurrency)
        return True

    def _progress(self, phase: str, where: str, candidate: Candidate) -> None:
        _say(f"[{phase}: {where}] {candidate.describe(self.cores)} (configuration "
             f"{len(self.measurer.trials) + 1 if self.measurer else 1}, "
             f"{max(self.clock.left(), 0) / 60:.1f} min left)")

    def _result(self, config_path: Path | None, applied: bool) -> dict:
        assert self.measurer is not None and self.decision is not None
        objective = self.objective
        front = pareto_front(self.measurer.trials)
        chosen = self.decision.chosen
        return {
            "meta": {
                "command": "onnxserve tune " + " ".join(sys.argv[2:]),
                "machine": f"{this_cpu()}, no GPU used",
                "revision": self.revision,
                "client": (self.client.kind if self.client.analyzer is None
                           else f"perf_analyzer ({self.client.analyzer.binary})"),
                "objective": objective.describe(),
                "budget_ms": objective.p99_ms, "budget_x": self.args.latency_budget_x,
                "concurrency": objective.concurrency,
                "rate": objective.rate, "max_minutes": self.args.max_minutes,
                "seconds": round(self.clock.used(), 1), "window_s": self.client.window_s,
                "runs": self.args.runs, "error": self.error,
            },
            "model": self.args.model,
            "variants": [v.as_dict() for v in self.variants],
            "raw_onnxruntime": [p.as_dict() for p in self.profiles.values()],
            "transport_cost": None if self.cost is None else self.cost.as_dict(),
            "predictions": [p.as_dict() for p in self.predicted],
            "trials": [t.as_dict(objective) for t in self.measurer.trials],
            "front": [[t.number, t.points.index(p)] for t, p in front],
            "finalists": [{"describe": f.candidate.describe(self.cores),
                           "trials": [t.number for t in f.trials],
                           "scores": [round(s, 2) for s in f.scores(objective)],
                           "median": round(f.median(objective), 2),
                           "spread": round(f.spread(objective), 4)} for f in self.finalists],
            "not_measured": self.not_measured,
            "decision": {
                "chosen": None if chosen is None else chosen.describe(self.cores),
                "default": self.default.describe(self.cores),
                "beats_default": self.decision.beats_default,
                "reason": self.decision.reason,
                "config": None if config_path is None else str(config_path),
                "serve_flags": [] if chosen is None else chosen.serve_flags(),
                "applied": applied,
            },
            "without_variants": None if self.own_decision is None else {
                "chosen": (None if self.own_decision.chosen is None
                           else self.own_decision.chosen.describe(self.cores)),
                "beats_default": self.own_decision.beats_default,
                "reason": self.own_decision.reason,
                "serve_flags": ([] if self.own_decision.chosen is None
                                else self.own_decision.chosen.serve_flags()),
            },
        }


def write_config(chosen: Candidate, config: ModelConfig, out: Path, repository: Path,
                 apply: bool) -> tuple[Path, Path | None]:
    """Write ``chosen`` applied to ``config`` (its model's) as ``out``/<model>/config.pbtxt
    and, with ``apply``, into ``repository`` too, keeping the config it replaces as
    ``out``/<model>/config.pbtxt.before; (the file under ``out``, the repository's file
    written or None)."""
    text = text_format.MessageToString(chosen.apply(config))
    config_path = out / chosen.model / "config.pbtxt"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(text)
    if not apply:
        return config_path, None
    target = repository / chosen.model / "config.pbtxt"
    if target.is_file():
        shutil.copy2(target, config_path.with_name("config.pbtxt.before"))
    target.write_text(text)
    return config_path, target


def _revision() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes), None outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tune(args: argparse.Namespace) -> int:
    if not args.model_repository.is_dir():
        print(f"onnxserve tune: model repository {args.model_repository} is not a folder",
              file=sys.stderr)
        return 2
    try:
        tuner = Tuner(args)
        budget = (f"p99 within {args.latency_budget_x:g} x batch-1 latency"
                  if args.latency_budget_x is not None else tuner.objective.describe())
        _say(f"onnxserve tune {args.model}: {budget}, at most {args.max_minutes:g} min; "
             f"results to {args.out}")
        tuner.costs()
        try:
            tuner.search()
            tuner.confirm()
        except Exception as exc:  # report what was measured, saying what stopped it
            if tuner.measurer is None or not tuner.measurer.trials:
                raise
            tuner.error = f"{type(exc).__name__}: {exc}"
            print(f"onnxserve tune: stopped by {tuner.error}; reporting what was measured",
                  file=sys.stderr)
        code = tuner.report()
        return 1 if tuner.error else code
    except TuneError as exc:
        print(f"onnxserve tune: {exc}", file=sys.stderr)
        return 2
