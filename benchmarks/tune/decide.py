"""Which configuration `onnxserve tune` chooses, and the Pareto front it reports.

The finalists (the best configurations of the search and the model's own, the default) are
each measured several times, in turns, each time on a freshly started server; a finalist's
figure is the median of its runs and its run-to-run spread the range they cover. A
configuration wins over another only when their ranges do not overlap: inside the spread
there is no winner. So the model's own configuration is kept unless the best beats it
beyond both spreads, and among configurations the best cannot be told apart from, the
one that uses the least server CPU per inference is chosen.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .candidates import Candidate
from .measure import Objective, Point, Trial


def pareto_front(trials: list[Trial]) -> list[tuple[Trial, Point]]:
    """The measured points no other point beats on both throughput (higher) and p99
    (lower), from every trial, by throughput."""
    points = [(t, p) for t in trials for p in t.points if not p.errors]
    front = [(t, p) for t, p in points
             if not any((q.throughput >= p.throughput and q.p99_ms < p.p99_ms)
                        or (q.throughput > p.throughput and q.p99_ms <= p.p99_ms)
                        for _, q in points)]
    return sorted(front, key=lambda tp: tp[1].throughput)


@dataclass
class Finalist:
    """One configuration measured several times (its ``trials``: the search's and the
    confirmation's runs)."""

    candidate: Candidate
    trials: list[Trial]

    def scores(self, objective: Objective) -> list[float]:
        return [t.score(objective) for t in self.trials]

    def median(self, objective: Objective) -> float:
        return statistics.median(self.scores(objective))

    def low(self, objective: Objective) -> float:
        return min(self.scores(objective))

    def high(self, objective: Objective) -> float:
        return max(self.scores(objective))

    def spread(self, objective: Objective) -> float:
        """(highest - lowest) / median of its runs' figures (0 with one run)."""
        median = self.median(objective)
        return (self.high(objective) - self.low(objective)) / median if median else 0.0

    def cpu_per_inference(self, objective: Objective) -> float:
        """Median server CPU % per inference/s at its best points (lower is cheaper)."""
        values = [p.server_cpu_percent / p.throughput for t in self.trials
                  if (p := t.best(objective)) is not None and p.throughput]
        return statistics.median(values) if values else float("inf")

    def apart(self, other: Finalist, objective: Objective) -> bool:
        """Whether the two ranges of figures do not overlap (told apart beyond spread)."""
        return (self.low(objective) > other.high(objective)
                or other.low(objective) > self.high(objective))


@dataclass
class Decision:
    """The configuration chosen (None: none met the budget) and why."""

    chosen: Candidate | None
    #: whether it was called a winner over the model's own configuration
    beats_default: bool
    reason: str


def decide(finalists: list[Finalist], default: Finalist, objective: Objective,
           unit: str, min_runs: int = 2) -> Decision:
    """Choose among ``finalists`` (``default`` among them); ``unit`` names the figure
    (``inferences/s``, or ``1000/p99 ms`` with a fixed rate) in the reason. A winner over
    the default needs ``min_runs`` runs of both (fewer: the spread is not known)."""
    meeting = [f for f in finalists if f.median(objective) > 0]
    if not meeting:
        return Decision(None, False, f"no configuration met {objective.describe()} in most "
                                     "of its runs")
    best = max(meeting, key=lambda f: f.median(objective))

    def figures(f: Finalist) -> str:
        median, runs = f.median(objective), len(f.trials)
        over = sum(1 for score in f.scores(objective) if not score)
        return (f"median {median:.1f} {unit}, runs {f.low(objective):.1f} to "
                f"{f.high(objective):.1f} ({runs} runs"
                + (f", spread {f.spread(objective):.1%}" if median else "")
                + (f"; {over} of them over the budget at every load measured" if over else "")
                + ")")

    def against_default() -> str:
        if not default.median(objective):
            return f"against the model's own configuration ({figures(default)})"
        gain = best.median(objective) / default.median(objective) - 1
        return f"{gain:+.1%} against the model's own configuration ({figures(default)})"

    if best is default:
        if len(meeting) == 1:
            return Decision(default.candidate, False, (
                f"no other configuration measured met {objective.describe()}: the model's own "
                f"configuration is kept ({figures(default)})"))
        return Decision(default.candidate, False,
                        f"the model's own configuration measured best: {figures(default)}")
    if not default.median(objective):  # it broke the budget in most runs, or never served
        tied = [f for f in meeting if f is not best and not f.apart(best, objective)]
        chosen = min([best, *tied], key=lambda f: f.cpu_per_inference(objective))
        served = any(t.points for t in default.trials)
        own = figures(default) if served else "it did not serve: " + "; ".join(
            t.failure or "no figures" for t in default.trials[:1])
        reason = (f"{chosen.candidate.describe()}: {figures(chosen)}; the model's own "
                  f"configuration did not meet {objective.describe()} in most of its runs "
                  f"({own})")
        if tied:
            reason += ("; " + ", ".join(f.candidate.describe() for f in [best, *tied]
                                        if f is not chosen)
                       + " measured within its spread: the one using the least server CPU "
                         "per inference is chosen")
        return Decision(chosen.candidate, True, reason)
    runs = min(len(best.trials), len(default.trials))
    if runs < min_runs:
        return Decision(default.candidate, False, (
            f"the best measured, {best.candidate.describe()} ({figures(best)}), "
            f"{against_default()}; with {runs} run(s) the run-to-run spread is not known "
            "(--max-minutes ran out before the confirmation): no winner called, the model's "
            "own configuration is kept"))
    if not best.apart(default, objective):
        return Decision(default.candidate, False, (
            f"the best measured, {best.candidate.describe()} ({figures(best)}), "
            f"{against_default()}, is inside the run-to-run spread: no winner called, the "
            "model's own configuration is kept"))
    tied = [f for f in meeting if f is not best and f is not default
            and not f.apart(best, objective) and f.apart(default, objective)]
    chosen = min([best, *tied], key=lambda f: f.cpu_per_inference(objective))
    reason = (f"{best.candidate.describe()}: {figures(best)}, {against_default()}, beyond "
              "both run-to-run spreads")
    if tied:
        reason += ("; " + ", ".join(f.candidate.describe() for f in tied)
                   + " measured within its spread, so no winner is called among them and "
                     "the one using the least server CPU per inference is chosen: "
                   + chosen.candidate.describe())
    return Decision(chosen.candidate, True, reason)
