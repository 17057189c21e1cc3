"""Load a user's Keras model safely: a file never runs code while it is loaded.

``.keras`` and ``.h5`` files load with Keras' safe mode, which refuses Lambda layers that
carry Python bytecode; a model that needs custom objects fails with a message naming
them. A TensorFlow SavedModel folder is wrapped as a graph (no Python code from it runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class UserModelError(RuntimeError):
    """The model file cannot be loaded safely, or has a shape onnxserve cannot export."""


def load(path: Path):
    """A single-input Keras model from ``path`` (.keras, .h5 or a SavedModel folder)."""
    import keras

    if not path.exists():
        raise UserModelError(f"--from {path}: no such file or folder")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UserModelError(f"--from {path}: a folder must be a SavedModel (saved_model.pb)")
        try:
            model = _wrap_savedmodel(path)
        except UserModelError:
            raise
        except Exception as exc:
            raise UserModelError(f"--from {path}: cannot load the SavedModel: {exc}") from None
    elif path.suffix in (".keras", ".h5", ".hdf5"):
        try:
            model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        except Exception as exc:
            raise UserModelError(
                f"--from {path}: Keras refused to load it safely ({type(exc).__name__}: "
                f"{_first_line(exc)}). onnxserve loads models in safe mode and never runs code "
                "from a file: a Lambda layer or a custom layer class cannot be exported this way"
            ) from None
    else:
        raise UserModelError(f"--from {path}: expected a .keras or .h5 file or a SavedModel folder")
    if len(model.inputs) != 1:
        raise UserModelError(f"--from {path}: the model has {len(model.inputs)} inputs; "
                             "onnxserve exports single-input models")
    if not hasattr(model, "output_names"):  # Sequential: the functional view names outputs
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _wrap_savedmodel(path: Path):
    """A Keras model around a SavedModel's serving signature (a graph: no Python runs)."""
    import keras
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    specs = list(signature.structured_input_signature[1].values())
    if len(specs) != 1:
        raise UserModelError(f"the SavedModel's serving signature takes {len(specs)} inputs, not 1")
    spec = specs[0]
    inputs = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype.name, name=spec.name)
    outputs = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")(inputs)
    if isinstance(outputs, dict):
        outputs = [keras.layers.Identity(name=k)(v) for k, v in sorted(outputs.items())]
    return keras.Model(inputs, outputs, name="savedmodel")


def sample_inputs(model, count: int, seed: int = 0) -> np.ndarray:
    """Random inputs of the model's shape (variable dims become 32) for the parity check."""
    spec = model.inputs[0]
    shape = tuple(d if d is not None else 32 for d in spec.shape[1:])
    dtype = np.dtype(spec.dtype)
    rng = np.random.default_rng(seed)
    if dtype.kind in "ui":
        return rng.integers(0, 256 if dtype.kind == "u" else 128, (count, *shape)).astype(dtype)
    return rng.random((count, *shape), dtype=np.float32).astype(dtype)
