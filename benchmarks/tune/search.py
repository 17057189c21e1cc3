"""Which configurations `onnxserve tune` serves: predicted from the cheap measurements
(benchmarks/tune/costs.py) and pruned, then varied one knob at a time around the best one
measured (a coordinate search, not a grid).

The prediction, for ``instances`` sessions of ``threads`` threads each (using every core:
more threads than cores only make sessions steal each other's cores) of a model variant:

- a request's latency is at least the do-nothing server's round trip ``o`` plus the run of
  its batch; a request that arrives while a batch runs waits for it, so a batch of ``b``
  fits the budget when ``o + 2 * latency(b) <= budget``: the largest such ``b`` (a measured
  batch size, at most max_batch_size, and at most the requests in flight per instance with
  a fixed --concurrency) is the preferred batch size;
- throughput is then at most ``instances * b / latency(b)``, and at most the requests/s the
  do-nothing server answers (with a fixed --request-rate: the headroom above it ranks);
- a shape whose batch of 1 alone (plus ``o``) exceeds the budget is pruned, as is one
  that cannot keep up with a fixed --request-rate.

The few best predicted are served; the rest are reported with their predicted figure.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from .candidates import Candidate
from .costs import RawProfile, TransportCost
from .measure import Objective
from .variants import ModelVariant

#: Models whose batch of 1 runs faster than this (ms) are small enough for the event loop
#: choice (onnxserve.run_on_event_loop) to matter (serving/runtime/plan.py's INLINE_LIMIT_S
#: is the warm-up's own threshold).
EVENT_LOOP_LIMIT_MS = 1.0
#: The shortest max_queue_delay tried (us): less is below the scheduler's timer resolution.
MIN_QUEUE_DELAY_US = 50


def _powers_of_two_and(n: int) -> list[int]:
    """The powers of two below ``n``, and ``n``."""
    sizes = {n}
    p = 1
    while p < n:
        sizes.add(p)
        p *= 2
    return sorted(sizes)


def thread_counts(cores: int) -> list[int]:
    """Intra-op thread counts worth measuring on ``cores`` cores: powers of two below it,
    and ``cores``."""
    return _powers_of_two_and(cores)


def shapes(cores: int) -> list[tuple[int, int]]:
    """(instances, threads per instance) pairs that use every core once."""
    return [(cores // t, t) for t in thread_counts(cores) if cores % t == 0]


def batch_sizes(max_batch_size: int) -> list[int]:
    """Batch sizes raw onnxruntime is measured at: powers of two up to max_batch_size, and
    max_batch_size itself ([1] for a model without a batch dimension)."""
    return _powers_of_two_and(max_batch_size) if max_batch_size > 0 else [1]


@dataclass
class Prediction:
    """A configuration's predicted throughput within the budget, or why it is pruned."""

    candidate: Candidate
    #: inferences/s predicted within the budget (0: pruned for the budget or the rate)
    throughput: float
    #: the largest batch predicted to fit the budget
    batch: int
    note: str
    #: served and measured (False: pruned, or predicted below those served)
    served: bool = False

    @property
    def viable(self) -> bool:
        return self.throughput > 0

    def as_dict(self) -> dict:
        return {"candidate": self.candidate.describe(), "throughput": round(self.throughput, 1),
                "batch": self.batch, "note": self.note, "served": self.served}


def predict(variant: ModelVariant, profile: RawProfile, cost: TransportCost,
            objective: Objective, instances: int, threads: int,
            cores: int | None = None) -> Prediction:
    """The prediction (module docstring) for ``instances`` x ``threads`` of ``variant``
    (``cores``: this machine's, by default)."""
    cores = cores or os.cpu_count() or 1
    mbs = variant.config.max_batch_size
    o = cost.round_trip_ms
    budget = objective.p99_ms
    one = profile.latency_ms(threads, 1)
    # the server's own share of the cores is left to it: a thread count in the config also
    # keeps a small model's batches off the event loop (serving/runtime/plan.py)
    share = max(1, cores // instances)
    candidate = Candidate(model=variant.name, variant=variant.variant, instances=instances,
                          intra_op_threads=0 if threads == share else threads,
                          batching=mbs > 0)
    if o + one > budget:
        return Prediction(candidate, 0.0, 0, (
            f"pruned: a batch of 1 takes {one:.2f} ms with {threads} thread(s), plus "
            f"{o:.2f} ms per request through a do-nothing server: over the {budget:g} ms "
            "budget"))
    fitting = [b for b in profile.batch_sizes(threads)
               if b <= max(mbs, 1) and o + 2 * profile.latency_ms(threads, b) <= budget]
    batch = max(fitting, default=1)
    if objective.rate is None:  # no more requests in flight than the load has
        in_flight = objective.concurrency or objective.max_concurrency
        batch = min(batch, max(1, math.ceil(in_flight / instances)))
    latency = profile.latency_ms(threads, batch)
    capacity = min(instances * batch * 1000.0 / latency, cost.requests_per_s)
    if mbs > 0:
        candidate = replace(candidate, preferred_batch_size=batch if batch < mbs else 0)
    note = (f"batches of {batch} in {latency:.2f} ms on each of {instances} instance(s): "
            f"at most {capacity:.0f}/s")
    if objective.rate is not None and capacity < objective.rate:
        return Prediction(candidate, 0.0, batch, f"pruned: {note}, below the "
                          f"{objective.rate:g}/s asked for")
    return Prediction(candidate, capacity, batch, note)


def predictions(variants: list[ModelVariant], profiles: dict[str, RawProfile],
                cost: TransportCost, objective: Objective, cores: int) -> list[Prediction]:
    """Every shape of every variant that is a candidate, best predicted first."""
    out = [predict(v, profiles[v.name], cost, objective, instances, threads, cores)
           for v in variants if v.refused is None
           for instances, threads in shapes(cores)]
    return sorted(out, key=lambda p: -p.throughput)


def neighbours(best: Candidate, variant: ModelVariant, profile: RawProfile,
               cost: TransportCost, objective: Objective, cores: int,
               transports: tuple[str, ...]) -> list[tuple[str, list[Candidate]]]:
    """The configurations one knob away from ``best``, by knob, the knobs that usually
    matter most first. ``transports``: the gRPC transports this server can run (native
    only where it is built)."""
    e = best.effective(cores)
    mbs = variant.config.max_batch_size
    groups: list[tuple[str, list[Candidate]]] = []
    if cores >= 2 and e.workers == 1:  # each worker its share of the cores, split as now
        groups.append(("workers", [replace(best, workers=2,
                                           instances=max(1, e.instances // 2),
                                           intra_op_threads=0)]))
    if e.batching and mbs > 1:
        current = e.preferred_batch_size or mbs
        sizes = {max(1, current // 2), min(mbs, current * 2), 0} - {e.preferred_batch_size}
        groups.append(("preferred batch size", [
            replace(best, preferred_batch_size=s if s < mbs else 0)
            for s in sorted(sizes, key=lambda s: (s == 0, s))
            if (s if s < mbs else 0) != e.preferred_batch_size]))
    groups.append(("spinning", [replace(best, spinning=mode) for mode in ("off", "always")
                                if mode != e.spinning]))
    if profile.latency_ms(e.intra_op_threads, 1) < EVENT_LOOP_LIMIT_MS:
        # the event loop runs one batch at a time: one instance only (plan.py refuses more)
        groups.append(("event loop", [replace(best, run_on_event_loop=value)
                                      for value in (True, False)
                                      if value != best.run_on_event_loop
                                      and (e.instances == 1 or not value)]))
    current_transport = best.grpc_transport or transports[0]
    groups.append(("gRPC transport", [replace(best, grpc_transport=t) for t in transports
                                      if t != current_transport]))
    if e.batching:
        delay = _queue_delay_us(best, profile, cost, objective, cores, mbs)
        if e.max_queue_delay_us:
            groups.append(("max queue delay", [replace(best, max_queue_delay_us=0)]))
        elif delay:
            groups.append(("max queue delay", [replace(best, max_queue_delay_us=delay)]))
        groups.append(("dynamic batching", [replace(best, batching=False,
                                                    preferred_batch_size=0,
                                                    max_queue_delay_us=0)]))
    # a value that serves as ``best`` does (the server's default spelled out) is no step
    return [(knob, kept) for knob, values in groups
            if (kept := [v for v in values if v.effective(cores) != e])]


def _queue_delay_us(best: Candidate, profile: RawProfile, cost: TransportCost,
                    objective: Objective, cores: int, mbs: int) -> int:
    """A max_queue_delay that leaves the budget's slack: half of what remains after the
    round trip and two runs of the preferred batch (0 when that is under
    MIN_QUEUE_DELAY_US)."""
    e = best.effective(cores)
    batch = e.preferred_batch_size or mbs
    slack_ms = objective.p99_ms - cost.round_trip_ms - 2 * profile.latency_ms(
        e.intra_op_threads, batch)
    delay = int(slack_ms * 1000 / 2)
    return delay if delay >= MIN_QUEUE_DELAY_US else 0

