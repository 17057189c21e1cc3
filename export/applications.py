"""keras.applications ImageNet models, with their preprocessing built into the graph.

The exported model takes UINT8 NHWC pixels at the model's input size and applies the
model's own ``preprocess_input`` inside the graph, so clients send raw pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be downloaded or read."""


@dataclass(frozen=True)
class Application:
    name: str
    #: keras.applications constructor name
    constructor: str
    size: int
    #: keras preprocess_input mode: "tf" maps to [-1, 1], "caffe" BGR minus means,
    #: "torch" ImageNet mean/std, "none" when the model normalises inside itself.
    preprocessing: str


APPLICATIONS = {
    a.name: a
    for a in (Application("mobilenet_v2", "MobileNetV2", 224, "tf"),)
}


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, shipped with onnxserve (no download)."""
    text = resources.files("onnxserve.export").joinpath("data/imagenet_classes.txt").read_text()
    labels = text.splitlines()
    assert len(labels) == 1000, len(labels)
    return labels


def _preprocess_layers(mode: str):
    from keras import layers

    if mode == "tf":
        return [layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")]
    raise ValueError(f"preprocessing mode {mode!r} is not implemented")


#: BatchNormalization gain applied to randomly initialised models (see _liven_random_weights).
RANDOM_BN_GAIN = 4.0


def _liven_random_weights(model) -> None:
    """Scale every BatchNormalization gamma so random-weight outputs depend on the input.

    With Keras' default initialisation, activations shrink layer by layer: MobileNetV2's
    output is exactly 1/1000 for every class and every input, which would make the
    export's parity check (and any test built on it) vacuous.
    """
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
            gamma, *rest = layer.get_weights()
            layer.set_weights([gamma * RANDOM_BN_GAIN, *rest])


def build(app: Application, weights: str):
    """The Keras model with uint8 image input; ``weights`` is imagenet, none or a file path."""
    import keras

    constructor = getattr(keras.applications, app.constructor)
    shape = (app.size, app.size, 3)
    if weights == "imagenet":
        try:
            base = constructor(weights="imagenet", input_shape=shape)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"cannot get the ImageNet weights for {app.name} ({type(exc).__name__}: {exc}). "
                "Download the Keras weights file where you have network access and pass "
                "--weights PATH, or use --weights none for random weights"
            ) from None
    else:
        base = constructor(weights=None, input_shape=shape)
        if weights == "none":
            _liven_random_weights(base)
        else:
            path = Path(weights)
            if not path.is_file():
                raise WeightsUnavailableError(f"--weights {weights}: no such file")
            try:
                base.load_weights(str(path))
            except Exception as exc:
                raise WeightsUnavailableError(
                    f"--weights {weights} does not fit {app.constructor}: {exc}"
                ) from None
    images = keras.Input(shape=shape, dtype="uint8", name="images")
    x = keras.layers.Rescaling(1.0, name="to_float")(images)  # casts uint8 to float32
    for layer in _preprocess_layers(app.preprocessing):
        x = layer(x)
    probabilities = base(x)
    return keras.Model(images, probabilities, name=app.name)
