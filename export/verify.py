"""Parity: the ONNX model must give the Keras model's outputs on the same inputs.

Softmax outputs are compared in two ways, because a small absolute tolerance on
probabilities says nothing when they are all near 1/1000 (random weights):
probabilities within ``PROB_ATOL`` absolute, and log-probabilities (equivalently the
logits up to a constant) within ``LOGP_ATOL`` wherever the probability is above
``LOGP_FLOOR``. The top-1 class must agree on every sample, and a model whose scores are flat over
the classes is refused, since matching it proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROB_ATOL = 1e-4
LOGP_ATOL = 1e-2
LOGP_FLOOR = 1e-6


class ParityError(RuntimeError):
    """ONNX and Keras outputs differ beyond the tolerances."""


@dataclass
class ParityReport:
    samples: int
    max_abs_prob_diff: float
    max_abs_logp_diff: float
    top1_agreement: float

    def __str__(self) -> str:
        return (
            f"parity on {self.samples} samples: max |dp| {self.max_abs_prob_diff:.2e} "
            f"(tol {PROB_ATOL:.0e}), max |dlog p| {self.max_abs_logp_diff:.2e} "
            f"(tol {LOGP_ATOL:.0e}), top-1 agreement {self.top1_agreement:.1%}"
        )


def compare(keras_probs: np.ndarray, onnx_probs: np.ndarray) -> ParityReport:
    """Compare two [batch, classes] probability arrays; raise ParityError beyond tolerance."""
    if keras_probs.shape != onnx_probs.shape:
        raise ParityError(
            f"output shapes differ: Keras {keras_probs.shape}, ONNX {onnx_probs.shape}"
        )
    k = keras_probs.astype(np.float64)
    o = onnx_probs.astype(np.float64)
    if np.ptp(k, axis=1).max() < 1e-6:
        raise ParityError(
            "the Keras model gives (nearly) the same score to every class on every sample, "
            "so a comparison would prove nothing"
        )
    prob_diff = float(np.max(np.abs(k - o)))
    mask = (k > LOGP_FLOOR) & (o > LOGP_FLOOR)
    logp_diff = float(np.max(np.abs(np.log(k[mask]) - np.log(o[mask])))) if mask.any() else 0.0
    agreement = float(np.mean(k.argmax(axis=1) == o.argmax(axis=1)))
    report = ParityReport(len(k), prob_diff, logp_diff, agreement)
    if prob_diff > PROB_ATOL or logp_diff > LOGP_ATOL or agreement < 1.0:
        raise ParityError(f"ONNX output does not match Keras: {report}")
    return report


def check(keras_model, onnx_bytes: bytes, inputs: np.ndarray, batch_size: int = 32) -> ParityReport:
    """Run ``inputs`` through both models and compare."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    keras_out = np.asarray(keras_model.predict(inputs, batch_size=batch_size, verbose=0))
    onnx_out = np.concatenate(
        [
            session.run(None, {input_name: inputs[i : i + batch_size]})[0]
            for i in range(0, len(inputs), batch_size)
        ]
    )
    return compare(keras_out, onnx_out)
