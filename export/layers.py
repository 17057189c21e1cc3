"""Small Keras layers the exported graphs need (imports Keras: export side only)."""

from __future__ import annotations

from collections.abc import Sequence

import keras


@keras.saving.register_keras_serializable(package="onnxserve")
class ChannelReverse(keras.layers.Layer):
    """Reverse the channel (last) axis: RGB to BGR, as caffe-style preprocessing wants."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1)


@keras.saving.register_keras_serializable(package="onnxserve")
class Standardize(keras.layers.Layer):
    """``(x - mean) / std`` per channel, with mean and std fixed at construction.

    Not keras.layers.Normalization: its statistics are captured tensors, which tf2onnx
    turns into extra graph inputs instead of constants.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def call(self, inputs):
        mean = keras.ops.convert_to_tensor(self.mean, dtype=inputs.dtype)
        std = keras.ops.convert_to_tensor(self.std, dtype=inputs.dtype)
        return (inputs - mean) / std

    def get_config(self) -> dict:
        return {**super().get_config(), "mean": self.mean, "std": self.std}


def exportable(trained, *, input_dtype: str = "float32", preprocessing=(), input_name="input"):
    """The model to export: optional preprocessing layers, then ``trained``, with outputs
    ``logits`` and ``probabilities``.

    ``trained`` must have a layer named ``logits`` (the last Dense, without activation)
    and end in the softmax. ``preprocessing`` layers run first, on ``input_dtype`` input
    (layers see float32: a leading cast is added for integer input).
    """
    core = keras.Model(trained.inputs, [trained.get_layer("logits").output, trained.output])
    inputs = keras.Input(shape=trained.inputs[0].shape[1:], dtype=input_dtype, name=input_name)
    x = inputs
    if input_dtype != "float32":
        x = keras.layers.Rescaling(1.0, name="to_float")(x)  # casts to float32
    for layer in preprocessing:
        x = layer(x)
    logits, probabilities = core(x)
    return keras.Model(
        inputs,
        [keras.layers.Identity(name="logits")(logits),
         keras.layers.Identity(name="probabilities")(probabilities)],
        name=trained.name,
    )
