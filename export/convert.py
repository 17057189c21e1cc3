"""Convert a Keras model to ONNX with tf2onnx, within a small memory budget.

tf2onnx's usual path freezes every variable into a graph constant, and TensorFlow,
grappler and tf2onnx then hold the weights several times over: exporting VGG19 (548 MB
of weights) that way peaked above 24 GB. Here the model is traced as a pure function of
its inputs *and its weights* (Keras 3's ``stateless_call``), so the graph tf2onnx
converts holds no weights at all; the weights are then attached to the ONNX graph as
initializers, one copy each. VGG19 exports in under 5 GB this way.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: protobuf cannot serialise a message above 2 GB; bigger models keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1
_WEIGHT_PREFIX = "onnxserve_weight_"


def to_onnx(model, *, opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of a single-input Keras model, dynamic batch dimension.

    Graph inputs and outputs keep the Keras model's input and output names; constants
    are folded (see fold_constants).
    """
    import tensorflow as tf
    import tf2onnx

    (keras_input,) = model.inputs
    input_name = keras_input.name.split(":")[0]
    trainable = list(model.trainable_variables)
    non_trainable = list(model.non_trainable_variables)
    variables = trainable + non_trainable
    weight_specs = [
        tf.TensorSpec(v.shape, v.dtype, name=f"{_WEIGHT_PREFIX}{i}")
        for i, v in enumerate(variables)
    ]
    input_spec = tf.TensorSpec((None, *keras_input.shape[1:]), keras_input.dtype, name=input_name)
    output_names = [name.split(":")[0] for name in model.output_names]
    n_trainable = len(trainable)

    @tf.function(input_signature=[input_spec, *weight_specs])
    def forward(x, *weights):
        outputs, _ = model.stateless_call(
            list(weights[:n_trainable]), list(weights[n_trainable:]), x, training=False
        )
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return {name: tf.identity(out, name=name) for name, out in zip(output_names, outputs,
                                                                        strict=True)}

    concrete = forward.get_concrete_function()
    # Tensors the model holds outside its variables (e.g. Normalization statistics given
    # to the constructor) are captured by the traced graph; tf2onnx leaves them as inputs.
    captured = {
        placeholder.name: value.numpy()
        for value, placeholder in zip(concrete.captured_inputs, concrete.graph.internal_captures,
                                      strict=True)
        if value.dtype != tf.resource
    }
    onnx_model, _ = tf2onnx.convert.from_function(
        forward, input_signature=[input_spec, *weight_specs], opset=opset,
        output_path=None,
    )
    weights = {f"{_WEIGHT_PREFIX}{i}": v.numpy() for i, v in enumerate(variables)}
    _inputs_to_initializers(onnx_model, input_name, weights, captured)
    _rename_outputs(onnx_model, output_names)
    del weights, captured
    onnx_model = fold_constants(onnx_model)
    log.info(
        "converted %s to ONNX opset %d: input %s, outputs %s", model.name, opset,
        onnx_model.graph.input[0].name, ", ".join(output_names),
    )
    return onnx_model


def _captured_value(name: str, captured: dict[str, np.ndarray]) -> np.ndarray | None:
    # tf2onnx prefixes the traced graph's names with the enclosing scope.
    matches = [v for k, v in captured.items() if name == k or name.endswith("/" + k)]
    if len(matches) > 1:
        raise ValueError(f"graph input {name} matches {len(matches)} captured tensors")
    return matches[0] if matches else None


def _inputs_to_initializers(
    onnx_model, input_name: str, weights: dict[str, np.ndarray], captured: dict[str, np.ndarray]
) -> None:
    """Turn every graph input but the model's own into an initializer holding its value."""
    from onnx import numpy_helper

    graph = onnx_model.graph
    used = {name for node in graph.node for name in node.input}
    kept = []
    for graph_input in graph.input:
        name = graph_input.name.split(":")[0]
        if name == input_name:
            kept.append(graph_input)
            continue
        value = weights.get(name)
        if value is None:
            value = _captured_value(graph_input.name, captured)
        if value is None:
            raise ValueError(f"graph input {graph_input.name} is neither the model input, "
                             "a weight nor a captured tensor")
        if graph_input.name in used:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), graph_input.name))
    del graph.input[:]
    graph.input.extend(kept)


def fold_constants(onnx_model):
    """Precompute what depends only on weights (the kernel transposes tf2onnx inserts).

    Weights enter the converted graph as inputs, so tf2onnx cannot fold them; onnxruntime's
    basic (provider-independent) optimisations do, and write a standard ONNX model.
    Quantizers need this: they expect weights as plain initializers.
    """
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    if onnx_model.ByteSize() > PROTOBUF_LIMIT:
        log.warning("model over 2 GB: constants left unfolded (onnxruntime folds them at load)")
        return onnx_model
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(onnx_model, str(source))
        del onnx_model
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(target))


def _rename_outputs(onnx_model, names: list[str]) -> None:
    """tf2onnx names outputs after the graph tensors (``Identity:0``): use the Keras names."""
    graph = onnx_model.graph
    for graph_output in graph.output:
        wanted = next((n for n in names if graph_output.name.split(":")[0].endswith(n)), None)
        if wanted is None or graph_output.name == wanted:
            continue
        old = graph_output.name
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = wanted
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = wanted
        graph_output.name = wanted


def keep_outputs(onnx_model, names: list[str]) -> None:
    """Drop every graph output but ``names``, in place (the nodes stay)."""
    outputs = [o for o in onnx_model.graph.output if o.name in names]
    del onnx_model.graph.output[:]
    onnx_model.graph.output.extend(outputs)
