"""Convert a Keras model to ONNX with tf2onnx, keeping the batch dimension dynamic."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def to_onnx(model, *, opset: int = DEFAULT_OPSET, output_name: str = "probabilities"):
    """Return the ONNX ModelProto for a single-input, single-output Keras model.

    The graph's input keeps the Keras input's name; the output is renamed ``output_name``.
    """
    import tensorflow as tf
    import tf2onnx

    (keras_input,) = model.inputs
    name = keras_input.name.split(":")[0]
    spec = tf.TensorSpec((None, *keras_input.shape[1:]), keras_input.dtype, name=name)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=[spec], opset=opset)
    _rename_output(onnx_model, output_name)
    graph_input = onnx_model.graph.input[0]
    log.info(
        "converted %s to ONNX opset %d: input %s, output %s",
        model.name, opset, graph_input.name, output_name,
    )
    return onnx_model


def _rename_output(onnx_model, new_name: str) -> None:
    graph = onnx_model.graph
    if len(graph.output) != 1:
        raise ValueError(f"expected one output, the graph has {len(graph.output)}")
    old = graph.output[0].name
    if old == new_name:
        return
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new_name
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new_name
    graph.output[0].name = new_name
