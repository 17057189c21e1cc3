"""Parity: the ONNX model must compute what the Keras model computes, on the same inputs.

Checks, each able to fail:

- probabilities within ``PROB_ATOL`` absolute;
- logits (when the model exposes them) within ``LOGITS_RTOL`` of each sample's largest
  logit magnitude. Relative, because a random-weight ImageNet model's activations decay
  to ~1e-12 and its softmax is flat: an absolute tolerance there proves nothing, but the
  logits still differ from class to class and must match to float32 precision;
- the top-1 class agrees on every sample whose best two logits are further apart than
  the observed error (on a near-tie, float rounding may pick either);
- a model whose scores are identical across classes for every sample is refused.

Models without a logits output compare log-probabilities instead.

Any other model (your own, ``check_generic``) is compared output by output: floating-point
outputs within ``LOGITS_RTOL`` of the output's largest Keras magnitude, integer, boolean
and string outputs exactly; an output's dtype and shape must match too. Every figure a
report prints is one it computed, with the tolerance it applied.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

PROB_ATOL = 1e-4
LOGITS_RTOL = 1e-3
LOGP_ATOL = 1e-2
LOGP_FLOOR = 1e-6


class ParityError(RuntimeError):
    """ONNX and Keras outputs differ beyond the tolerances."""


@dataclass
class ParityReport:
    """The classifier check: probabilities, logits (or log-probabilities) and top-1."""

    samples: int
    max_abs_prob_diff: float
    #: max |dlogits| / max |logits| (per sample), or max |dlog p| without logits
    max_rel_score_diff: float
    compared_on: str
    #: share of decisive samples with the same top-1 class; None when no sample was decisive
    top1_agreement: float | None
    decisive_samples: int

    def __str__(self) -> str:
        if self.compared_on == "logits":
            scores = (f"logits max rel diff {self.max_rel_score_diff:.2e} "
                      f"(tol {LOGITS_RTOL:.0e} of the sample's largest |logit|)")
        else:
            scores = (f"{self.compared_on} max |d log p| {self.max_rel_score_diff:.2e} "
                      f"(tol {LOGP_ATOL:.0e}, where p > {LOGP_FLOOR:.0e})")
        if self.top1_agreement is None:
            top1 = ("top-1 not compared (on no sample are the best two scores further apart "
                    "than the error)")
        else:
            top1 = (f"top-1 agreement {self.top1_agreement:.1%} of {self.decisive_samples} "
                    "decisive samples")
        return (f"parity on {self.samples} samples: max |dp| {self.max_abs_prob_diff:.2e} "
                f"(tol {PROB_ATOL:.0e}), {scores}, {top1}")

    def as_dict(self) -> dict:
        return asdict(self)


def compare(
    keras_probs: np.ndarray,
    onnx_probs: np.ndarray,
    keras_logits: np.ndarray | None = None,
    onnx_logits: np.ndarray | None = None,
) -> ParityReport:
    """Compare [batch, classes] outputs; raise ParityError beyond tolerance."""
    if keras_probs.shape != onnx_probs.shape:
        raise ParityError(
            f"output shapes differ: Keras {keras_probs.shape}, ONNX {onnx_probs.shape}"
        )
    kp, op = keras_probs.astype(np.float64), onnx_probs.astype(np.float64)
    prob_diff = float(np.max(np.abs(kp - op)))
    if keras_logits is not None and onnx_logits is not None:
        scores_k, scores_o = keras_logits.astype(np.float64), onnx_logits.astype(np.float64)
        compared_on, tolerance = "logits", LOGITS_RTOL
        scale = np.max(np.abs(scores_k), axis=1, keepdims=True)
        rel = np.abs(scores_k - scores_o) / np.where(scale > 0, scale, 1.0)
        score_diff = float(rel.max())
        abs_err = np.max(np.abs(scores_k - scores_o), axis=1)
    else:
        compared_on, tolerance = "log-probabilities", LOGP_ATOL
        scores_k, scores_o = np.log(np.maximum(kp, 1e-30)), np.log(np.maximum(op, 1e-30))
        mask = (kp > LOGP_FLOOR) & (op > LOGP_FLOOR)
        score_diff = float(np.max(np.abs(scores_k - scores_o)[mask])) if mask.any() else 0.0
        abs_err = np.max(np.where(mask, np.abs(scores_k - scores_o), 0.0), axis=1)
    if np.ptp(scores_k, axis=1).max() == 0.0:
        raise ParityError(
            f"the Keras model gives every class the same {compared_on} on every sample, "
            "so a comparison would prove nothing"
        )
    ordered = np.sort(scores_k, axis=1)
    gap = ordered[:, -1] - ordered[:, -2]
    decisive = gap > 2 * abs_err
    agree = scores_k.argmax(axis=1) == scores_o.argmax(axis=1)
    agreement = float(agree[decisive].mean()) if decisive.any() else None
    report = ParityReport(
        samples=len(kp),
        max_abs_prob_diff=prob_diff,
        max_rel_score_diff=score_diff,
        compared_on=compared_on,
        top1_agreement=agreement,
        decisive_samples=int(decisive.sum()),
    )
    if prob_diff > PROB_ATOL or score_diff > tolerance or (agreement is not None
                                                          and agreement < 1.0):
        raise ParityError(f"ONNX output does not match Keras: {report}")
    return report


def run_keras(model, inputs: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Keras outputs by name (a single-output model gives {"probabilities": ...})."""
    import keras

    outputs = keras.tree.flatten(model.predict(inputs, batch_size=batch_size, verbose=0))
    names = [n.split(":")[0] for n in model.output_names]
    return {name: np.asarray(out) for name, out in zip(names, outputs, strict=True)}


def run_onnx(session, inputs: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """onnxruntime outputs by name, computed in batches."""
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {input_name: inputs[i : i + batch_size]})
             for i in range(0, len(inputs), batch_size)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


def check(keras_model, session, inputs: np.ndarray) -> ParityReport:
    """Run ``inputs`` through Keras and the onnxruntime session and compare."""
    k = run_keras(keras_model, inputs)
    o = run_onnx(session, inputs)
    return compare(k["probabilities"], o["probabilities"], k.get("logits"), o.get("logits"))


@dataclass
class OutputParity:
    """How one output of the ONNX model compares with Keras."""

    name: str
    #: numpy dtype name of the Keras output (float32, int64, bool, ...)
    dtype: str
    #: compared for equality (integer, boolean and string outputs)
    exact: bool
    #: values compared (all samples, all elements)
    values: int
    #: values that differ (exact outputs); floating point: values beyond the tolerance,
    #: or NaN / infinite on one side only
    mismatches: int
    #: floating point only: max |reference - other| and that over max |reference|
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    #: floating point only: the relative tolerance applied; None: none was (a report)
    tolerance: float | None = None

    def __str__(self) -> str:
        if self.exact:
            return f"{self.name} ({self.dtype}) exact: {self.mismatches} of {self.values} differ"
        text = (f"{self.name} ({self.dtype}) max |d| {self.max_abs_diff:.2e}, max rel diff "
                f"{self.max_rel_diff:.2e}")
        if self.tolerance is not None:
            text += f" (tol {self.tolerance:.0e} of max |Keras|)"
        if self.mismatches and (self.tolerance is None or self.max_rel_diff <= self.tolerance):
            text += f", {self.mismatches} NaN/inf on one side only"
        return text

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenericParityReport:
    """Every output of a model compared, on one or more input shapes."""

    #: per-sample input shape -> number of samples checked at that shape
    shapes: list[tuple[tuple[int, ...], int]]
    outputs: list[OutputParity] = field(default_factory=list)
    compared_on: str = "outputs"

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.shapes)

    def __str__(self) -> str:
        where = ""
        if len(self.shapes) > 1:
            where = " (" + ", ".join(f"{n} of {'x'.join(map(str, shape))}"
                                     for shape, n in self.shapes) + ")"
        return (f"parity on {self.samples} samples{where}: "
                + "; ".join(str(o) for o in self.outputs))

    def as_dict(self) -> dict:
        return {"samples": self.samples, "compared_on": self.compared_on,
                "shapes": [{"shape": list(shape), "samples": n} for shape, n in self.shapes],
                "outputs": [o.as_dict() for o in self.outputs]}


def compare_output(name: str, ref: np.ndarray, got: np.ndarray,
                   rtol: float | None = LOGITS_RTOL) -> OutputParity:
    """Compare one output ``got`` with the reference ``ref``; ParityError if the dtype
    (unless ``rtol`` is None) or the shape differs.

    Floating point: NaN and infinities must sit at the same places; the finite values
    within ``rtol`` of the output's largest finite |reference| value (``rtol`` None:
    differences are measured, not judged). Anything else exactly.
    """
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.dtype != got.dtype and rtol is not None:
        raise ParityError(f"output {name}: Keras gives {ref.dtype}, ONNX {got.dtype}")
    if ref.shape != got.shape:
        raise ParityError(f"output {name}: Keras shape {ref.shape}, ONNX {got.shape}")
    if ref.dtype.kind not in "fc":
        mismatches = int(np.count_nonzero(ref != got))
        return OutputParity(name, str(ref.dtype), True, ref.size, mismatches)
    r, g = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(r) & np.isfinite(g)
    # NaN == NaN here: a non-finite value must be the same non-finite value
    special = int(np.count_nonzero(~finite & ~((r == g) | (np.isnan(r) & np.isnan(g)))))
    diff = np.abs(r - g)[finite]
    scale = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    beyond = 0
    if rtol is not None:
        beyond = int(np.count_nonzero(diff > (rtol * scale if scale > 0 else rtol)))
    mismatches = special + beyond
    return OutputParity(name, str(ref.dtype), False, ref.size, mismatches, max_abs,
                        max_abs / scale if scale > 0 else max_abs, rtol)


def check_generic(keras_model, session, inputs: np.ndarray | list[np.ndarray]) -> (
        GenericParityReport):
    """Parity for any model, every output (see compare_output), on each input batch.

    ``inputs``: one array [batch, ...] or several of different per-sample shapes (a
    variable-size model is checked at each). ParityError names the outputs that differ.
    """
    batches = inputs if isinstance(inputs, list) else [inputs]
    report = GenericParityReport(shapes=[(tuple(b.shape[1:]), len(b)) for b in batches])
    merged: dict[str, OutputParity] = {}
    for batch in batches:
        k = run_keras(keras_model, batch)
        o = run_onnx(session, batch)
        if list(k) != list(o):
            raise ParityError(f"outputs differ: Keras {', '.join(k)}, ONNX {', '.join(o)}")
        for name, ref in k.items():
            result = compare_output(name, ref, o[name])
            merged[name] = result if name not in merged else _worse(merged[name], result)
    report.outputs = list(merged.values())
    bad = [o for o in report.outputs if not o.ok]
    if bad:
        raise ParityError(f"ONNX output does not match Keras in {', '.join(o.name for o in bad)}: "
                          f"{report}")
    return report


def variant_difference(name: str, fp32: np.ndarray, other: np.ndarray) -> OutputParity:
    """How a reduced-precision variant's output differs from fp32's: measured, no
    tolerance (fp16 and int8 differ by design)."""
    return compare_output(name, fp32, other, rtol=None)


def _worse(a: OutputParity, b: OutputParity) -> OutputParity:
    """Two comparisons of one output (different input shapes) as one."""
    if a.exact:
        return OutputParity(a.name, a.dtype, True, a.values + b.values,
                            a.mismatches + b.mismatches)
    return OutputParity(a.name, a.dtype, False, a.values + b.values, a.mismatches + b.mismatches,
                        max(a.max_abs_diff or 0.0, b.max_abs_diff or 0.0),
                        max(a.max_rel_diff or 0.0, b.max_rel_diff or 0.0), a.tolerance)


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of samples whose best class is the same in both score arrays."""
    return float(np.mean(reference.argmax(axis=1) == other.argmax(axis=1)))


def timing_options(threads: int | None = None):
    """onnxruntime session options as the server's defaults give a model's one CPU instance
    (serving/models/execution.plan_execution, serving/runtime/runner.session_options):
    ``threads`` intra-op threads (default: every core, os.cpu_count()), one inter-op
    thread, sequential execution, every graph optimisation, threads spinning while a run
    lasts and stopping when it ends. Written out here because the export never imports the
    server (tests/unit/project/test_layers.py); tests/unit/export/test_int8.py checks that
    both stay the same."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def median_latency_ms(sessions: dict[str, object], inputs: dict[str, np.ndarray], *,
                      min_runs: int = 20, max_runs: int = 100,
                      budget_s: float = 5.0) -> dict[str, float]:
    """Median wall-clock milliseconds of one ``run`` of each onnxruntime session on its
    input (``inputs``: by the same keys as ``sessions``; the whole array is one request).

    The sessions take turns, one run each per round, so a load that comes and goes on the
    machine slows each alike; one warm-up run each first. Rounds go on until ``min_runs``
    are done and ``budget_s`` seconds have passed, or ``max_runs`` are done. KeyError when
    a session has no input.
    """
    feeds = {key: {session.get_inputs()[0].name: inputs[key]}
             for key, session in sessions.items()}
    for key, session in sessions.items():
        session.run(None, feeds[key])
    times: dict[str, list[float]] = {key: [] for key in sessions}
    started = time.perf_counter()
    for done in range(1, max_runs + 1):
        for key, session in sessions.items():
            begin = time.perf_counter()
            session.run(None, feeds[key])
            times[key].append(time.perf_counter() - begin)
        if done >= min_runs and time.perf_counter() - started >= budget_s:
            break
    return {key: float(np.median(values) * 1e3) for key, values in times.items()}


@dataclass
class OpTime:
    """The operators of one type in one kind of arithmetic, over one run."""

    op_type: str
    #: "integer" (8-bit inputs), "float", or "conversion" (QuantizeLinear, DequantizeLinear,
    #: Cast between integers and floats)
    kind: str
    nodes: int
    ms: float

    def as_dict(self) -> dict:
        return asdict(self)


_CONVERSIONS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast")


def op_profile(model_path: str, sample: np.ndarray, *, runs: int = 10) -> list[OpTime]:
    """Where one run of the model on ``sample`` ([batch, *input shape]) spends its time,
    after onnxruntime's graph optimisation (QDQ groups fused into integer kernels), with
    the timing options: per operator type and kind, the sum over its nodes of each
    node's fastest time over ``runs`` runs (the fastest, so that other processes' load
    does not count), most expensive first. ``model_path``: an ONNX file."""
    import json
    import os
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = timing_options()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model_path, sess_options=options,
                                       providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: sample}
        session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    durations: dict[str, list[float]] = {}
    kinds: dict[str, tuple[str, str]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op_type = args.get("op_name", "?")
        types = [next(iter(t)) for t in args.get("input_type_shape", []) if t]
        if op_type in _CONVERSIONS:
            kind = "conversion"
        elif types and types[0] in ("uint8", "int8"):
            kind = "integer"
        else:
            kind = "float"
        durations.setdefault(event["name"], []).append(event["dur"] / 1e3)
        kinds[event["name"]] = (op_type, kind)
    totals: dict[tuple[str, str], OpTime] = {}
    for name, values in durations.items():
        op_type, kind = kinds[name]
        entry = totals.setdefault((op_type, kind), OpTime(op_type, kind, 0, 0.0))
        entry.nodes += 1
        entry.ms += min(values[1:] or values)  # the first run is the warm-up
    return sorted(totals.values(), key=lambda t: -t.ms)


def op_summary(profile: list[OpTime]) -> str:
    """One line: milliseconds per kind of arithmetic and the operator types in each, e.g.
    ``1.61 ms integer (QLinearConv x52, QLinearAdd x12), 0.13 ms float (Gemm, Softmax)``."""
    parts = []
    for kind in ("integer", "float", "conversion"):
        ops = [t for t in profile if t.kind == kind]
        if ops:
            names = ", ".join(t.op_type + (f" x{t.nodes}" if t.nodes > 1 else "") for t in ops)
            parts.append(f"{sum(t.ms for t in ops):.2f} ms {kind} ({names})")
    return ", ".join(parts)
