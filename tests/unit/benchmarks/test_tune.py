"""`onnxserve tune`'s parts that need no server: configurations written into and read from
config.pbtxt, the cheap measurements' interpolation, the prediction and pruning, the knobs
varied, the load sweep, the decision with its run-to-run spread, the Pareto front, the
report and the command line (a tune run on a test model:
tests/served/test_tune_served.py)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import text_format
from support.onnx_models import add_one_model, scores_model
from support.repositories import build_test_models

from onnxserve.benchmarks.tune import TuneError, report
from onnxserve.benchmarks.tune.candidates import Candidate
from onnxserve.benchmarks.tune.costs import RawProfile, TransportCost
from onnxserve.benchmarks.tune.decide import Finalist, decide, pareto_front
from onnxserve.benchmarks.tune.measure import Measurer, Objective, Point, Trial
from onnxserve.benchmarks.tune.search import (
    batch_sizes,
    neighbours,
    predict,
    predictions,
    shapes,
    thread_counts,
)
from onnxserve.benchmarks.tune.variants import find_variants
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.models.options import model_options
from onnxserve.serving.process import onnxserve_command
from onnxserve.serving.runtime.plan import plan_execution

CONFIG = """
name: "m"
max_batch_size: 32
input { name: "x" data_type: TYPE_FP32 dims: [4] }
output { name: "y" data_type: TYPE_FP32 dims: [4] }
dynamic_batching { max_queue_delay_microseconds: 100 default_queue_policy { max_queue_size: 7 } }
parameters { key: "onnxserve.note" value { string_value: "kept" } }
"""


def _config(text: str = CONFIG) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


# -- configurations ---------------------------------------------------------------------

def test_a_candidate_reads_the_models_own_configuration() -> None:
    default = Candidate.from_config(_config())
    assert default == Candidate(model="m", instances=1, intra_op_threads=0, batching=True,
                                preferred_batch_size=0, max_queue_delay_us=100)
    tuned = _config(CONFIG + """
instance_group { count: 2 kind: KIND_CPU }
parameters { key: "intra_op_thread_count" value { string_value: "1" } }
parameters { key: "onnxserve.spinning" value { string_value: "OFF" } }
parameters { key: "onnxserve.run_on_event_loop" value { string_value: "false" } }
""")
    tuned.dynamic_batching.preferred_batch_size.extend([2, 8])
    assert Candidate.from_config(tuned) == Candidate(
        model="m", instances=2, intra_op_threads=1, batching=True, preferred_batch_size=8,
        max_queue_delay_us=100, spinning="off", run_on_event_loop=False)
    assert not Candidate.from_config(_config(CONFIG.replace(
        "dynamic_batching { max_queue_delay_microseconds: 100 default_queue_policy { "
        "max_queue_size: 7 } }", ""))).batching


def test_a_candidate_writes_its_knobs_and_keeps_the_rest_of_the_config() -> None:
    candidate = Candidate(model="m", instances=2, intra_op_threads=1, preferred_batch_size=4,
                          max_queue_delay_us=250, spinning="always", run_on_event_loop=False)
    config = candidate.apply(_config())
    assert Candidate.from_config(config) == candidate  # what it writes reads back
    assert config.max_batch_size == 32  # the model's contract: never changed
    assert [i.name for i in config.input] == ["x"] and config.output[0].name == "y"
    assert config.parameters["onnxserve.note"].string_value == "kept"
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 7
    # the server takes it as written
    options = model_options(config)
    plan = plan_execution(config, options, cores=2)
    assert (plan.instances, plan.session.intra_op, plan.session.spinning) == (2, 1, "always")
    # the defaults written back remove the parameters rather than spelling them out
    plain = Candidate(model="m").apply(config)
    assert "intra_op_thread_count" not in plain.parameters
    assert "onnxserve.spinning" not in plain.parameters
    assert not plain.dynamic_batching.preferred_batch_size
    off = Candidate(model="m", batching=False).apply(config)
    assert not off.HasField("dynamic_batching")


def test_a_candidate_refuses_a_config_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="config of 'other' given for a candidate of 'm'"):
        Candidate(model="m").apply(_config(CONFIG.replace('"m"', '"other"')))
    with pytest.raises(ValueError, match="dynamic batching needs max_batch_size > 0"):
        Candidate(model="m").apply(_config(CONFIG.replace("max_batch_size: 32",
                                                          "max_batch_size: 0")))


def test_equal_effective_candidates_serve_alike() -> None:
    default = Candidate(model="m")
    assert default.effective(cores=2) == Candidate(model="m", spinning="run").effective(2)
    # a thread count in the config keeps batches off the event loop (plan.py): not alike
    pinned = Candidate(model="m", intra_op_threads=2)
    assert pinned.effective(2) != default.effective(2)
    assert pinned.effective(2) == replace(pinned, run_on_event_loop=False).effective(2)
    assert "in worker threads" in pinned.describe(2)
    assert Candidate(model="m", instances=2).effective(2).run_on_event_loop is False
    # sessions whose threads outnumber the cores do not spin
    assert Candidate(model="m", instances=2, intra_op_threads=2).effective(2).spinning == "off"
    assert Candidate(model="m", workers=2).threads(cores=4) == 2
    assert Candidate(model="m", instances=2).threads(cores=2) == 1
    assert (Candidate(model="m", batching=False, preferred_batch_size=4).effective(2)
            == Candidate(model="m", batching=False).effective(2))
    assert Candidate(model="m", workers=2, grpc_transport="python").serve_flags() == [
        "--workers", "2", "--grpc-transport", "python"]
    assert "2 instances x 1 thread, batching to 4, 2 workers" in Candidate(
        model="m", instances=2, preferred_batch_size=4, workers=2).describe(cores=4)


# -- the cheap measurements and the prediction ------------------------------------------------

def _profile(model: str = "m", one: float = 1.0, two: float = 0.6) -> RawProfile:
    """latency(b) = per-thread figure x (0.5 + b / 2) ms."""
    profile = RawProfile(model)
    for threads, base in ((1, one), (2, two)):
        for b in (1, 2, 4, 8, 16, 32):
            profile.latencies_ms[threads, b] = base * (0.5 + b / 2)
    return profile


def test_raw_latency_between_measured_batch_sizes_is_interpolated() -> None:
    profile = RawProfile("m", {(1, 1): 1.0, (1, 4): 4.0})
    assert profile.latency_ms(1, 1) == 1.0
    assert profile.latency_ms(1, 2) == pytest.approx(2.0)
    assert profile.latency_ms(1, 8) == pytest.approx(8.0)  # beyond: from the last two
    # a thread count not measured (the model's own 3 of 6 cores...) reads the nearest
    profile.latencies_ms[4, 1] = 0.5
    assert profile.latency_ms(2, 1) == 1.0 and profile.latency_ms(3, 1) == 0.5
    with pytest.raises(KeyError, match="no raw measurement"):
        RawProfile("m").latency_ms(1, 1)


def test_shapes_use_every_core_once_and_batch_sizes_reach_max_batch_size() -> None:
    assert thread_counts(2) == [1, 2] and thread_counts(6) == [1, 2, 4, 6]
    assert shapes(2) == [(2, 1), (1, 2)]
    assert shapes(6) == [(6, 1), (3, 2), (1, 6)]
    assert batch_sizes(12) == [1, 2, 4, 8, 12] and batch_sizes(0) == [1]


class _Variant:
    def __init__(self, name: str = "m", variant: str = "fp32", mbs: int = 32) -> None:
        self.name, self.variant, self.refused = name, variant, None
        self.config = _config(CONFIG.replace("max_batch_size: 32", f"max_batch_size: {mbs}"))


COST = TransportCost(round_trip_ms=0.5, requests_per_s=10_000)


def test_the_prediction_fits_the_batch_to_the_budget() -> None:
    profile = _profile()
    # one thread: latency(b) = 0.5 + b/2; 0.5 + 2 * latency(b) <= 6 holds up to b = 4
    p = predict(_Variant(), profile, COST, Objective(6.0), instances=2, threads=1, cores=2)
    assert p.viable and p.batch == 4
    # the server's own share of the cores is left to it; another count is written
    assert p.candidate == Candidate(model="m", instances=2, intra_op_threads=0,
                                    preferred_batch_size=4)
    assert predict(_Variant(), profile, COST, Objective(6.0), 2, 1,
                   cores=4).candidate.intra_op_threads == 1
    # a sweep never has more requests in flight than --max-concurrency
    assert predict(_Variant(), profile, COST, Objective(6.0, max_concurrency=2), 2, 1,
                   cores=2).batch == 1
    assert p.throughput == pytest.approx(2 * 4 * 1000 / 2.5)
    # with 3 requests in flight, 2 instances never see batches above 2
    fixed = predict(_Variant(), profile, COST, Objective(6.0, concurrency=3), 2, 1)
    assert fixed.batch == 2
    # a batch of 1 over the budget: pruned, saying why
    over = predict(_Variant(), profile, COST, Objective(1.2), instances=2, threads=1)
    assert not over.viable and "a batch of 1 takes 1.00 ms with 1 thread(s)" in over.note
    # a fixed rate the shape cannot keep up with
    slow = predict(_Variant(), profile, COST, Objective(6.0, rate=50_000), 2, 1)
    assert not slow.viable and "below the 50000/s asked for" in slow.note
    # with a fixed rate, the headroom above it ranks
    assert predict(_Variant(), profile, COST, Objective(6.0, rate=100), 2, 1).throughput == (
        p.throughput)
    # the do-nothing server's ceiling bounds any shape
    capped = predict(_Variant(), profile, TransportCost(0.5, 100), Objective(60.0), 2, 1)
    assert capped.throughput == 100
    # the batch fitting everything is max_batch_size: no preferred size written
    roomy = predict(_Variant(mbs=8), profile, COST, Objective(100.0), 1, 2)
    assert roomy.batch == 8 and roomy.candidate.preferred_batch_size == 0


def test_predictions_rank_every_shape_of_every_variant() -> None:
    fast = _Variant("m_int8", "int8")
    ranked = predictions([_Variant(), fast],  # type: ignore[list-item]
                         {"m": _profile(), "m_int8": _profile("m_int8", 0.5, 0.3)}, COST,
                         Objective(6.0), cores=2)
    assert len(ranked) == 4
    assert ranked[0].candidate.model == "m_int8"
    assert [p.throughput for p in ranked] == sorted((p.throughput for p in ranked),
                                                    reverse=True)


def test_neighbours_change_one_knob_each() -> None:
    best = Candidate(model="m", instances=2, intra_op_threads=1, preferred_batch_size=4)
    groups = dict(neighbours(best, _Variant(), _profile(one=0.1, two=0.06),  # type: ignore[arg-type]
                             COST, Objective(6.0), 2, ("native", "python")))
    assert list(groups) == ["workers", "preferred batch size", "spinning", "gRPC transport",
                            "max queue delay", "dynamic batching"]
    for knob, values in groups.items():
        for value in values:
            changed = {k for k, v in vars(value).items() if v != vars(best)[k]}
            assert changed and (knob == "workers" or len(changed) == 1 or changed == {
                "batching", "preferred_batch_size"}), (knob, value)
    assert groups["workers"] == [replace(best, workers=2, instances=1, intra_op_threads=0)]
    assert [c.preferred_batch_size for c in groups["preferred batch size"]] == [2, 8, 0]
    # the event loop runs one batch at a time: never offered to two instances (which run
    # in worker threads already)
    assert "event loop" not in groups
    assert groups["gRPC transport"] == [replace(best, grpc_transport="python")]
    assert groups["max queue delay"][0].max_queue_delay_us > 0
    one = Candidate(model="m", intra_op_threads=2)
    loop = dict(neighbours(one, _Variant(), _profile(one=0.1, two=0.06),  # type: ignore[arg-type]
                           COST, Objective(6.0), 2, ("python",)))
    assert [c.run_on_event_loop for c in loop["event loop"]] == [True]  # pinned: False
    assert "gRPC transport" not in loop  # only one transport built
    slow = dict(neighbours(one, _Variant(), _profile(two=2.0), COST,  # type: ignore[arg-type]
                           Objective(6.0), 2, ("python",)))
    assert "event loop" not in slow  # a 2 ms batch of 1: not worth running inline


# -- the load sweep -------------------------------------------------------------------

class _FakeLoad:
    """Points of a server whose p99 grows with the load: p99 = c ms, throughput = 100 c
    up to ``plateau``."""

    def __init__(self, objective: Objective, plateau: int = 1000) -> None:
        self.objective, self.plateau = objective, plateau
        self.points: list[Point] = []

    def usable(self) -> bool:
        return True

    def at(self, concurrency: int, rate: float | None = None) -> Point:
        point = Point(concurrency, rate, 100.0 * min(concurrency, self.plateau), 1, 1,
                      float(concurrency), 0, True, 100, 10)
        point.meets = self.objective.meets(point)
        self.points.append(point)
        return point


def _sweep(objective: Objective, start: int = 1, plateau: int = 1000,
           upward: bool = True) -> list[int]:
    measurer = Measurer(Path(), {}, objective, None)  # type: ignore[arg-type]
    load = _FakeLoad(objective, plateau)
    measurer._sweep(load, start, upward)  # type: ignore[arg-type]
    return [p.concurrency for p in load.points]


def test_the_sweep_doubles_then_bisects_at_the_budget() -> None:
    assert _sweep(Objective(11.0)) == [1, 2, 4, 8, 16, 12]
    assert _sweep(Objective(11.0), start=32) == [32, 16, 8, 12]
    assert _sweep(Objective(0.5)) == [1]  # nothing within the budget
    assert _sweep(Objective(100.0, max_concurrency=8)) == [1, 2, 4, 8]
    assert _sweep(Objective(100.0), plateau=4) == [1, 2, 4, 8]  # 8 adds nothing: stop
    # a confirmation stays at its load, and goes down only when that breaks the budget
    assert _sweep(Objective(11.0), start=8, upward=False) == [8]
    assert _sweep(Objective(11.0), start=12, upward=False) == [12, 6, 9]


def test_the_objective_judges_points() -> None:
    point = Point(4, None, 1000.0, 1, 2, 5.0, 0, True, 100, 10)
    assert Objective(5.0).meets(point) and not Objective(4.9).meets(point)
    assert not Objective(5.0).meets(replace(point, errors=1))
    assert not Objective(5.0).meets(replace(point, p99_ms=float("nan")))
    assert Objective(5.0, rate=1000).meets(point)
    assert not Objective(5.0, rate=1100).meets(point)  # it did not keep up
    assert Objective(5.0).score(point) == 1000.0
    assert Objective(5.0, rate=1000).score(point) == 200.0  # 1000 / p99
    assert Objective(5.0).score(None) == 0.0


# -- the decision ---------------------------------------------------------------------

def _trial(candidate: Candidate, throughput: float, p99: float = 1.0, cpu: float = 100.0,
           number: int = 0) -> Trial:
    point = Point(4, None, throughput, 0.5, 0.8, p99, 0, True, cpu, 10)
    point.meets = p99 <= 5.0
    return Trial(number, candidate, "search", [point])


A, B, C = (Candidate(model="m", instances=i) for i in (1, 2, 3))
GOAL = Objective(5.0)


def _finalist(candidate: Candidate, *throughputs: float, cpu: float = 100.0) -> Finalist:
    return Finalist(candidate, [_trial(candidate, t, cpu=cpu) for t in throughputs])


def test_a_winner_is_called_only_beyond_the_spread() -> None:
    default = _finalist(A, 100, 104, 98)
    clear = _finalist(B, 130, 128, 133)
    decision = decide([clear, default], default, GOAL, "inferences/s")
    assert decision.chosen == B and decision.beats_default
    assert "+" in decision.reason and "beyond both run-to-run spreads" in decision.reason
    close = _finalist(B, 106, 99, 108)  # better median, ranges overlap
    decision = decide([close, default], default, GOAL, "inferences/s")
    assert decision.chosen == A and not decision.beats_default
    assert "inside the run-to-run spread: no winner called" in decision.reason
    once = _finalist(B, 200)  # one run: its spread is not known
    decision = decide([once, _finalist(A, 100)], _finalist(A, 100), GOAL, "inferences/s")
    assert decision.chosen == A and "spread is not known" in decision.reason


def test_runs_over_the_budget_count_as_zero_and_say_so() -> None:
    def runs(candidate: Candidate, *figures: float) -> Finalist:
        return Finalist(candidate, [_trial(candidate, t or 100, p99=1.0 if t else 9.0)
                                    for t in figures])

    default = runs(A, 0, 169, 0)  # over the budget in two of its three runs
    decision = decide([runs(B, 227, 227, 220), default], default, GOAL, "inferences/s")
    assert decision.chosen == B and decision.beats_default
    assert "2 of them over the budget at every load measured" in decision.reason
    # the model's own configuration broke the budget in most runs: the best that met it is
    # chosen, though their ranges overlap
    close = runs(C, 168, 173, 132)
    decision = decide([close, default], default, GOAL, "inferences/s")
    assert decision.chosen == C and decision.beats_default
    assert "did not meet p99 <= 5 ms" in decision.reason
    assert "+inf" not in decision.reason and "spread 0.0%" not in decision.reason
    # ... or never served
    broken = Finalist(A, [Trial(1, A, "default", failure="the server did not start: boom")])
    decision = decide([close, broken], broken, GOAL, "inferences/s")
    assert decision.chosen == C and "it did not serve: the server did not start: boom" in (
        decision.reason)


def test_among_configurations_inside_each_others_spread_the_cheapest_is_chosen() -> None:
    default = _finalist(A, 100, 101)
    best = _finalist(B, 150, 140, cpu=190)
    tied = _finalist(C, 145, 138, cpu=120)
    decision = decide([best, tied, default], default, GOAL, "inferences/s")
    assert decision.chosen == C and decision.beats_default
    assert "no winner is called among them" in decision.reason


def test_the_default_is_kept_when_it_measures_best_and_nothing_is_chosen_over_budget() -> None:
    default = _finalist(A, 150, 152)
    decision = decide([_finalist(B, 100, 101), default], default, GOAL, "inferences/s")
    assert decision.chosen == A and "the model's own configuration measured best" in (
        decision.reason)
    over = Finalist(A, [_trial(A, 100, p99=9.0), _trial(A, 100, p99=9.0)])
    assert decide([over], over, GOAL, "inferences/s").chosen is None


def test_the_pareto_front_keeps_the_points_nothing_beats() -> None:
    t1 = Trial(1, A, "x", [Point(1, None, 100, 1, 1, 1.0, 0, True, 1, 1),
                           Point(2, None, 180, 1, 1, 2.0, 0, True, 1, 1)])
    t2 = Trial(2, B, "x", [Point(1, None, 90, 1, 1, 1.5, 0, True, 1, 1),  # beaten by t1's
                           Point(4, None, 250, 1, 1, 4.0, 0, True, 1, 1),
                           Point(8, None, 260, 1, 1, 9.0, 5, True, 1, 1)])  # errors
    front = pareto_front([t1, t2])
    assert [(t.number, p.concurrency) for t, p in front] == [(1, 1), (1, 2), (2, 4)]


# -- variants -------------------------------------------------------------------------

def test_variants_are_found_measured_against_fp32_or_refused(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    shutil.copytree(tmp_path / "scores", tmp_path / "scores_int8")
    config = (tmp_path / "scores_int8" / "config.pbtxt")
    config.write_text('name: "scores_int8"\n' + config.read_text())
    add_one_model(tmp_path / "scores_fp16" / "1" / "model.onnx")  # other inputs
    found = find_variants(tmp_path, "scores")
    assert [(v.name, v.variant) for v in found] == [
        ("scores", "fp32"), ("scores_fp16", "fp16"), ("scores_int8", "int8")]
    assert found[0].inputs["scores_in"].shape == (5,)
    assert found[1].refused is not None and "'x'" in found[1].refused
    assert "a client could not switch to it by name alone" in found[1].refused
    agreement = found[2].agreement
    assert agreement is not None and agreement.top1 == 1.0 and agreement.max_abs_diff == 0
    assert [v.name for v in find_variants(tmp_path, "scores", variants=False)] == ["scores"]
    # float16 inputs (an fp16 variant exported with --fp16-io): clients would send other data
    from onnx import TensorProto, helper
    from support.onnx_models import save_model

    x = helper.make_tensor_value_info("scores_in", TensorProto.FLOAT16, ["batch", 5])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT16, ["batch", 5])
    shutil.rmtree(tmp_path / "scores_fp16")
    save_model(helper.make_graph([helper.make_node("Identity", ["scores_in"], ["scores"])],
                                 "h", [x], [y]), tmp_path / "scores_fp16" / "1" / "model.onnx")
    half = find_variants(tmp_path, "scores")[1]
    assert half.refused is not None and "float16" in half.refused
    with pytest.raises(TuneError, match="model 'absent' has no folder"):
        find_variants(tmp_path, "absent")


def test_a_single_file_repository_is_refused(tmp_path: Path) -> None:
    scores_model(tmp_path / "scores" / "model.onnx")  # KServe's layout: the file at the root
    with pytest.raises(TuneError, match="is a single-file repository"):
        find_variants(tmp_path / "scores", "scores")


def test_the_servers_tune_starts_inherit_no_onnxserve_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from onnxserve.serving.process import ServerProcess
    from onnxserve.serving.settings import setting_env_names

    names = setting_env_names()
    assert {"ONNXSERVE_WORKERS", "ONNXSERVE_GRPC_TRANSPORT", "ONNXSERVE_SPINNING"} <= set(names)
    monkeypatch.setenv("ONNXSERVE_WORKERS", "4")
    monkeypatch.setenv("OTHER_VARIABLE", "kept")
    child = ServerProcess([sys.executable, "-c", "import os; print(os.environ.get("
                           "'ONNXSERVE_WORKERS'), os.environ.get('OTHER_VARIABLE'))"],
                          "127.0.0.1:1", serve=False, drop_env=names)
    child.process.wait(timeout=60)
    assert child.output().split() == ["None", "kept"]


def test_a_model_with_a_variable_input_dimension_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper
    from support.onnx_models import save_model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    save_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "v", [x], [y]),
               tmp_path / "v" / "1" / "model.onnx")
    (tmp_path / "v" / "config.pbtxt").write_text('max_batch_size: 4\n')
    with pytest.raises(TuneError, match="measures inputs of one fixed shape"):
        find_variants(tmp_path, "v")


def test_a_model_without_a_batch_dimension_is_measured_whole(tmp_path: Path) -> None:
    from onnx import TensorProto, helper
    from support.onnx_models import save_model

    from onnxserve.benchmarks.raw_onnxruntime import raw_onnxruntime
    from onnxserve.benchmarks.tune.costs import profile_raw

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    save_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "w", [x], [y]),
               tmp_path / "w" / "1" / "model.onnx")
    (tmp_path / "w" / "config.pbtxt").write_text(
        'max_batch_size: 0\ninput { name: "x" data_type: TYPE_FP32 dims: [2, 5] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [2, 5] }\n')
    (whole,) = find_variants(tmp_path, "w")
    assert whole.inputs["x"].shape == (2, 5)
    assert Candidate.from_config(whole.config) == Candidate(model="w", batching=False)
    profile = profile_raw("w", whole.model_file, whole.inputs, batch_sizes(0), [1], 0.01,
                          batched=False)
    assert list(profile.latencies_ms) == [(1, 1)]
    with pytest.raises(ValueError, match="runs at batch size 1 only"):
        raw_onnxruntime(whole.model_file, whole.inputs, batch_sizes=(2,), batched=False)


# -- the phases, against a fake server -------------------------------------------------

class _FakeClock:
    def __init__(self, minutes: float) -> None:
        self.now, self.deadline = 0.0, minutes * 60

    def left(self) -> float:
        return self.deadline - self.now

    def used(self) -> float:
        return self.now


def _tuner(tmp_path: Path, minutes: float, monkeypatch: pytest.MonkeyPatch,
           speed=lambda c: 100.0 * c.instances * (3 if c.workers > 1 else 1)):
    """A Tuner whose servers are fakes: each configuration takes 10 s (2 s to start) and
    measures ``speed(candidate)`` inferences/s at concurrency 1 with p99 1 ms."""
    import argparse

    from onnxserve.benchmarks.tune import command
    from onnxserve.benchmarks.tune.variants import ModelVariant

    clock = _FakeClock(minutes)

    class FakeMeasurer(Measurer):
        def measure(self, candidate, phase, *, start_concurrency=1, fixed=None, run=0):
            trial = Trial(len(self.trials) + 1, candidate, phase, run=run)
            point = Point(1, None, speed(candidate), 0.5, 0.8, 1.0, 0, True, 100, 10)
            point.meets = self.objective.meets(point)
            trial.points, trial.seconds, trial.start_seconds = [point], 10.0, 2.0
            clock.now += 10
            self.trials.append(trial)
            return trial

    monkeypatch.setattr(command, "Measurer", FakeMeasurer)
    args = argparse.Namespace(
        model="m", model_repository=tmp_path, latency_budget_ms=6.0, latency_budget_x=None,
        concurrency=None, request_rate=None, max_concurrency=64, max_minutes=minutes,
        client="python", perf_analyzer=None, no_variants=True, window=1.0, max_windows=3,
        warmup=0.5, runs=3, out=tmp_path / "out", apply=False)
    tuner = command.Tuner(args)
    tuner.clock = clock  # type: ignore[assignment]
    tuner.cores = 2
    tuner.variants = [ModelVariant("m", "fp32", _config(), tmp_path / "m.onnx", {})]
    tuner.profiles = {"m": _profile()}
    tuner.cost = COST
    tuner.default = Candidate.from_config(_config())  # what the costs phase reads
    return tuner


def test_the_phases_search_confirm_and_choose(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tuner = _tuner(tmp_path, 15, monkeypatch)
    tuner.search()
    trials = tuner.measurer.trials
    assert trials[0].phase == "default" and trials[0].candidate == Candidate.from_config(
        _config())
    assert [t.phase for t in trials[1:3]] == ["predicted", "predicted"]
    assert "workers" in {t.phase for t in trials}  # knobs varied around the best
    keys = [t.candidate.effective(2) for t in trials]
    assert len(keys) == len(set(keys)), "no configuration served twice in the search"
    tuner.confirm()
    assert all(len(f.trials) == 3 for f in tuner.finalists)
    assert tuner.finalists[-1].candidate == tuner.default
    assert tuner.report() == 0
    decision = tuner.decision
    assert decision is not None and decision.beats_default
    assert decision.chosen is not None and decision.chosen.workers == 2  # 300/s vs 100/s
    assert (tmp_path / "out" / "m" / "config.pbtxt").is_file()
    assert (tmp_path / "out" / "tune.md").is_file()


def test_the_search_stops_at_max_minutes_keeping_time_to_confirm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    tuner = _tuner(tmp_path, 1.5, monkeypatch)  # the default, two predicted, then the reserve
    tuner.search()
    assert "--max-minutes: 60 s left" in capsys.readouterr().out
    assert [t.phase for t in tuner.measurer.trials] == ["default", "predicted", "predicted"]
    assert tuner.not_measured, "the configurations left are reported"
    tuner.confirm()
    assert [len(f.trials) for f in tuner.finalists] == [3, 3, 3]
    assert tuner.clock.used() <= 90
    assert tuner.report() == 0 and tuner.decision is not None
    assert tuner.decision.beats_default
    # no time for more than the default: kept, saying nothing else was measured
    short = _tuner(tmp_path, 0.3, monkeypatch)
    short.search()
    short.confirm()
    assert short.report() == 0 and short.decision is not None
    assert short.decision.chosen == short.default
    assert "no other configuration measured met" in short.decision.reason


# -- the report and the command line ----------------------------------------------------

def _result() -> dict:
    objective = Objective(5.0)
    trials = [_trial(A, 100, number=1), _trial(B, 150, number=2),
              Trial(3, C, "spinning", failure="the server did not start: boom")]
    return {
        "meta": {"command": "onnxserve tune m", "machine": "CPU", "revision": "abc",
                 "client": "python", "objective": objective.describe(), "budget_ms": 5.0,
                 "concurrency": None, "rate": None, "max_minutes": 1, "seconds": 50.0,
                 "window_s": 1, "runs": 3},
        "model": "m",
        "variants": [{"name": "m", "variant": "fp32", "refused": None, "agreement": None}],
        "raw_onnxruntime": [_profile().as_dict()],
        "transport_cost": COST.as_dict(),
        "predictions": [],
        "trials": [t.as_dict(objective) for t in trials],
        "front": [[2, 0]],
        "finalists": [{"describe": B.describe(), "trials": [2], "scores": [150.0],
                       "median": 150.0, "spread": 0.0}],
        "not_measured": ["m (fp32): 4 instances"],
        "decision": {"chosen": B.describe(), "default": A.describe(), "beats_default": True,
                     "reason": "faster", "config": "out/m/config.pbtxt",
                     "serve_flags": [], "applied": False},
    }


def test_the_report_shows_every_configuration_and_the_choice(tmp_path: Path) -> None:
    result = _result()
    written = report.write_report(result, tmp_path)
    text = (tmp_path / "tune.md").read_text()
    for trial in result["trials"]:
        assert f"| {trial['number']} | 0 | " in text
    assert "**" + B.describe() + "**" in text and "Why: faster." in text
    assert "the server did not start: boom" in text
    assert "Not measured (--max-minutes ran out): m (fp32): 4 instances." in text
    assert "| 1 thread(s) | 1.000 | 1.500 |" in text
    png = tmp_path / "tune.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_without_matplotlib_says_so_and_drops_an_old_plot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tune.png").write_bytes(b"an earlier run's plot")
    monkeypatch.setattr(report, "plot", lambda result, path: False)
    written = report.write_report(_result(), tmp_path)
    assert not (tmp_path / "tune.png").exists() and len(written) == 2
    assert "No plot: matplotlib is not installed" in (tmp_path / "tune.md").read_text()


def test_the_chosen_config_goes_into_the_repository_only_when_applied(tmp_path: Path) -> None:
    from onnxserve.benchmarks.tune.command import write_config

    repository, out = tmp_path / "repo", tmp_path / "out"
    (repository / "m").mkdir(parents=True)
    original = repository / "m" / "config.pbtxt"
    original.write_text(CONFIG)
    chosen = Candidate(model="m", instances=2)
    written, applied = write_config(chosen, _config(), out, repository, apply=False)
    assert written == out / "m" / "config.pbtxt" and applied is None
    assert original.read_text() == CONFIG
    assert Candidate.from_config(text_format.Parse(written.read_text(), ModelConfig())) == (
        Candidate(model="m", instances=2, max_queue_delay_us=0))
    written, applied = write_config(chosen, _config(), out, repository, apply=True)
    assert applied == original and original.read_text() == written.read_text()
    assert (out / "m" / "config.pbtxt.before").read_text() == CONFIG


@pytest.mark.parametrize("argv, message", [
    (["--latency-budget-ms", "0"], "0: expected more than 0 ms"),
    (["--latency-budget-ms", "5", "--concurrency", "2", "--request-rate", "9"],
     "not allowed with argument"),
    (["--latency-budget-ms", "5", "--runs", "1"], "1: expected 2 or more"),
    ([], "one of the arguments --latency-budget-ms --latency-budget-x is required"),
    (["--latency-budget-ms", "5", "--latency-budget-x", "2"], "not allowed with argument"),
])
def test_tune_refuses_bad_arguments(argv: list[str], message: str) -> None:
    result = subprocess.run(onnxserve_command("tune", "m", *argv), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_tune_names_a_missing_model_or_repository(tmp_path: Path) -> None:
    build_test_models(tmp_path / "repo")
    for repository, message in ((tmp_path / "none", "is not a folder"),
                                (tmp_path / "repo", "model 'absent' has no folder")):
        result = subprocess.run(onnxserve_command(
            "tune", "absent", "--latency-budget-ms", "5", "--model-repository",
            str(repository), "--out", str(tmp_path / "out")), capture_output=True, text=True,
            timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr
