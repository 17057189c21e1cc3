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


#: the name of the Keras model a SavedModel is wrapped in
SAVEDMODEL_NAME = "savedmodel"


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
    return keras.Model(inputs, outputs, name=SAVEDMODEL_NAME)


#: what each --preprocessing choice (serving/models/images.py's modes) feeds an image model
PREPROCESSING_CHOICES = {
    "in_graph": "pixels 0-255 as they are (the model scales them itself)",
    "unit": "pixels / 255, in [0, 1]",
    "tf": "pixels / 127.5 - 1, in [-1, 1]",
    "caffe": "BGR pixels 0-255 minus the ImageNet mean",
    "torch": "(pixels / 255 - ImageNet mean) / ImageNet std, RGB",
}
#: layers that leave pixel values on their scale at inference: looked through when
#: searching for the layer that scales the input
_PASS_THROUGH = {
    "InputLayer", "Identity", "Resizing", "CenterCrop", "Cropping2D", "RandomFlip",
    "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast",
    "RandomBrightness", "RandomCrop",
}
#: a leading Rescaling that maps 0-255 onto a range at most this wide takes raw pixels
_MAX_SCALED_RANGE = 4.0


def is_image_input(model) -> bool:
    """Whether the model's input is an image: [batch, H, W, 1 or 3] (H, W may vary)."""
    shape = tuple(model.inputs[0].shape[1:])
    return len(shape) == 3 and shape[2] in (1, 3)


def detect_preprocessing(model) -> tuple[str, str] | None:
    """The input convention the model's own layers show, as (mode, reason), or None.

    A Rescaling that maps 0-255 onto a small range (1/255; 1/127.5 with offset -1) or a
    Normalization right after the input (augmentation, resizing and cropping layers in
    between are looked through, nested models searched) means the graph takes raw 0-255
    pixels: ``in_graph``. Nothing else is guessed.
    """
    from .convert import graph_nodes

    graph = getattr(model, "_functional", None) or model
    if not getattr(graph, "inputs", None):
        return None
    tensor = graph.inputs[0]
    nodes = graph_nodes(graph)
    while True:
        consumers = [n for n in nodes if any(t is tensor for t in n.input_tensors)]
        if len(consumers) != 1 or len(consumers[0].output_tensors) != 1:
            return None
        layer = consumers[0].operation
        kind = type(layer).__name__
        if kind == "Normalization":
            return "in_graph", f"the model starts with a Normalization layer ({layer.name!r})"
        if kind == "Rescaling":
            scale = np.asarray(layer.scale, np.float64)
            offset = np.asarray(layer.offset, np.float64)
            if np.all(scale == 1.0) and np.all(offset == 0.0):
                pass  # an identity (a cast): look further
            elif np.all(scale > 0) and float(np.max(scale)) * 255 <= _MAX_SCALED_RANGE:
                return "in_graph", (
                    f"the model starts with Rescaling(scale={_number(scale)}, "
                    f"offset={_number(offset)}) ({layer.name!r}), so it takes pixels 0-255")
            else:
                return None
        elif graph_nodes(layer):  # a nested model
            inner = detect_preprocessing(layer)
            if inner is not None:
                return inner
            if any(type(n.operation).__name__ not in _PASS_THROUGH
                   for n in graph_nodes(layer)):
                return None
        elif kind not in _PASS_THROUGH:
            return None
        tensor = consumers[0].output_tensors[0]


def _number(values: np.ndarray) -> str:
    """A Rescaling factor for people: 1/255 rather than 0.00392156862745098."""
    if values.size != 1:
        return str([round(float(v), 6) for v in values.ravel()])
    value = float(values)
    if value and abs(1 / value - round(1 / value, 1)) < 1e-6 and abs(value) < 1:
        return f"1/{1 / value:g}"
    return f"{value:g}"


def sample_batches(model, count: int, preprocessing: str | None = None,
                   seed: int = 0) -> list[np.ndarray]:
    """Random parity inputs: ``count`` samples [count, *input shape] of the input's dtype.

    Variable dimensions get two different sizes, one batch each (an image of variable
    size: 32x40 and 64x48), so a shape the conversion fixed by mistake shows. Image
    inputs with a ``preprocessing`` mode get random 0-255 pixels scaled as the server
    scales them (serving/models/images.py), the range the model expects; other inputs random
    values in [0, 1) (floats) or 0-255 / 0-127 (unsigned / signed integers).
    """
    from onnxserve.protos.images import scale

    spec = model.inputs[0]
    dims = tuple(spec.shape[1:])
    dtype = np.dtype(spec.dtype)
    rng = np.random.default_rng(seed)
    variable = any(d is None for d in dims)
    batches = []
    for sizes in ([32, 40], [64, 48]) if variable else ([0],):
        fill = iter(sizes * len(dims))
        shape = tuple(d if d is not None else next(fill) for d in dims)
        if preprocessing is not None:
            pixels = rng.integers(0, 256, (count, *shape)).astype(np.uint8)
            batches.append(np.asarray(scale(pixels, preprocessing)).astype(dtype))
        elif dtype.kind in "ui":
            high = 256 if dtype.kind == "u" else 128
            batches.append(rng.integers(0, high, (count, *shape)).astype(dtype))
        else:
            batches.append(rng.random((count, *shape), dtype=np.float32).astype(dtype))
    return batches
