"""keras.applications ImageNet models, with their own preprocessing built into the graph.

By default the exported model takes UINT8 NHWC pixels at the model's input size and
applies the model's ``preprocess_input`` inside the graph, so clients send raw pixels (a
quarter of the bytes of float32) and cannot get preprocessing wrong. With
``raw_float_input`` the model takes FP32 input that the client has already preprocessed.
The classifier is built without its softmax, which follows as a separate layer, so the
export can check parity on the logits as well as on the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: keras preprocess_input modes. "tf": x / 127.5 - 1. "caffe": RGB to BGR, minus the
#: ImageNet means. "torch": x / 255, minus mean, over std. "none": the model normalises
#: inside itself (EfficientNet) and takes pixels 0-255.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be downloaded or read."""


@dataclass(frozen=True)
class Application:
    name: str
    #: keras.applications constructor name
    constructor: str
    #: keras.applications module holding preprocess_input
    module: str
    size: int
    preprocessing: str
    #: Keras' cached weights file name (include_top=True)
    weights_file: str


APPLICATIONS = {
    a.name: a
    for a in (
        Application("vgg19", "VGG19", "vgg19", 224, "caffe",
                    "vgg19_weights_tf_dim_ordering_tf_kernels.h5"),
        Application("inception_v3", "InceptionV3", "inception_v3", 299, "tf",
                    "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"),
        Application("resnet50", "ResNet50", "resnet50", 224, "caffe",
                    "resnet50_weights_tf_dim_ordering_tf_kernels.h5"),
        Application("mobilenet", "MobileNet", "mobilenet", 224, "tf",
                    "mobilenet_1_0_224_tf.h5"),
        Application("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, "tf",
                    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"),
        Application("densenet201", "DenseNet201", "densenet", 224, "torch",
                    "densenet201_weights_tf_dim_ordering_tf_kernels.h5"),
        Application("nasnet_large", "NASNetLarge", "nasnet", 331, "tf", "NASNet-large.h5"),
        Application("efficientnet_b1", "EfficientNetB1", "efficientnet", 240, "none",
                    "efficientnetb1.h5"),
        Application("xception", "Xception", "xception", 299, "tf",
                    "xception_weights_tf_dim_ordering_tf_kernels.h5"),
    )
}


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, shipped with onnxserve (no download)."""
    text = resources.files("onnxserve.export.data").joinpath("imagenet_classes.txt").read_text()
    labels = text.splitlines()
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet_classes.txt has {len(labels)} names, expected 1000")
    return labels


def preprocessing_layers(mode: str) -> list:
    """Keras layers computing ``preprocess_input`` of ``mode`` on float pixels 0-255."""
    from keras import layers

    from .layers import ChannelReverse, Standardize

    if mode == "tf":
        return [layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "caffe":
        return [
            ChannelReverse(name="rgb_to_bgr"),
            Standardize(CAFFE_MEAN_BGR, (1.0, 1.0, 1.0), name="preprocess_caffe"),
        ]
    if mode == "torch":
        return [
            layers.Rescaling(1.0 / 255.0, name="to_unit"),
            Standardize(TORCH_MEAN, TORCH_STD, name="preprocess_torch"),
        ]
    if mode == "none":
        return []
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected tf, caffe, torch or none")


def _load_base(app: Application, weights: str):
    import keras

    constructor = getattr(keras.applications, app.constructor)
    shape = (app.size, app.size, 3)
    if weights == "imagenet":
        try:
            return constructor(weights="imagenet", input_shape=shape, classifier_activation=None)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"cannot get the ImageNet weights for {app.name} ({type(exc).__name__}: {exc}). "
                f"Download Keras' {app.weights_file} where you have network access and pass "
                "--weights PATH, or use --weights none for random weights"
            ) from None
    base = constructor(weights=None, input_shape=shape, classifier_activation=None)
    if weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"--weights {weights}: no such file")
        try:
            base.load_weights(str(path))
        except Exception as exc:
            raise WeightsUnavailableError(
                f"--weights {weights} does not fit {app.constructor}: {exc}"
            ) from None
    return base


def build(app: Application, weights: str, *, raw_float_input: bool = False):
    """The Keras model to export, with outputs ``logits`` and ``probabilities``.

    ``weights`` is imagenet, none (random) or the path of a weights file.
    """
    import keras

    base = _load_base(app, weights)
    shape = (app.size, app.size, 3)
    if raw_float_input:
        images = keras.Input(shape=shape, dtype="float32", name="images")
        x = images
    else:
        images = keras.Input(shape=shape, dtype="uint8", name="images")
        x = keras.layers.Rescaling(1.0, name="to_float")(images)  # casts to float32
        for layer in preprocessing_layers(app.preprocessing):
            x = layer(x)
    logits = keras.layers.Identity(name="logits")(base(x))
    probabilities = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model(images, [logits, probabilities], name=app.name)
