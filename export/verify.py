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

Models without a logits output (user models) compare log-probabilities instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

PROB_ATOL = 1e-4
LOGITS_RTOL = 1e-3
LOGP_ATOL = 1e-2
LOGP_FLOOR = 1e-6


class ParityError(RuntimeError):
    """ONNX and Keras outputs differ beyond the tolerances."""


@dataclass
class ParityReport:
    samples: int
    max_abs_prob_diff: float
    #: max |dlogits| / max |logits| (per sample), or max |dlog p| without logits
    max_rel_score_diff: float
    compared_on: str
    top1_agreement: float
    decisive_samples: int

    def __str__(self) -> str:
        tol = LOGITS_RTOL if self.compared_on == "logits" else LOGP_ATOL
        return (
            f"parity on {self.samples} samples: max |dp| {self.max_abs_prob_diff:.2e} "
            f"(tol {PROB_ATOL:.0e}), {self.compared_on} max rel diff "
            f"{self.max_rel_score_diff:.2e} (tol {tol:.0e}), top-1 agreement "
            f"{self.top1_agreement:.1%} of {self.decisive_samples} decisive samples"
        )

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
    agreement = float(agree[decisive].mean()) if decisive.any() else 1.0
    report = ParityReport(
        samples=len(kp),
        max_abs_prob_diff=prob_diff,
        max_rel_score_diff=score_diff,
        compared_on=compared_on,
        top1_agreement=agreement,
        decisive_samples=int(decisive.sum()),
    )
    if prob_diff > PROB_ATOL or score_diff > tolerance or agreement < 1.0:
        raise ParityError(f"ONNX output does not match Keras: {report}")
    return report


def run_keras(model, inputs: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Keras outputs by name (a single-output model gives {"probabilities": ...})."""
    outputs = model.predict(inputs, batch_size=batch_size, verbose=0)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
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


def check_generic(keras_model, session, inputs: np.ndarray) -> ParityReport:
    """Parity for any model: every output within LOGITS_RTOL of its largest magnitude."""
    k = run_keras(keras_model, inputs)
    o = run_onnx(session, inputs)
    if sorted(k) != sorted(o):
        raise ParityError(f"outputs differ: Keras {sorted(k)}, ONNX {sorted(o)}")
    worst_abs = worst_rel = 0.0
    for name, ref in k.items():
        ref, got = ref.astype(np.float64), o[name].astype(np.float64)
        if ref.shape != got.shape:
            raise ParityError(f"output {name}: Keras shape {ref.shape}, ONNX {got.shape}")
        diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
    report = ParityReport(len(inputs), worst_abs, worst_rel, "outputs", 1.0, 0)
    if worst_rel > LOGITS_RTOL:
        raise ParityError(f"ONNX output does not match Keras: {report}")
    return report


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of samples whose best class is the same in both score arrays."""
    return float(np.mean(reference.argmax(axis=1) == other.argmax(axis=1)))


def batch1_latency_ms(session, sample: np.ndarray, runs: int = 20) -> float:
    """Median onnxruntime latency of one-sample requests, after a warm-up run."""
    input_name = session.get_inputs()[0].name
    x = sample[np.newaxis]
    session.run(None, {input_name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {input_name: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)
