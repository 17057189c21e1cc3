"""Convert a Keras model to ONNX with tf2onnx, within a small memory budget.

tf2onnx's usual path freezes every variable into a graph constant, and TensorFlow,
grappler and tf2onnx then hold the weights several times over: exporting VGG19 (548 MB
of weights) that way peaked above 24 GB. Here the model is traced as a pure function of
its inputs *and its weights* (Keras 3's ``stateless_call``), so the graph tf2onnx
converts holds no weights at all; the weights are then attached to the ONNX graph as
initializers, one copy each. VGG19 exports in under 5 GB this way.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: protobuf cannot serialise a message above 2 GB; bigger models keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1
_WEIGHT_PREFIX = "onnxserve_weight_"
VERBOSE_HINT = "run with --verbose for the converter's log"
#: What to do about TensorFlow ops tf2onnx leaves unconverted, by op type.
_ARGMAX_HINT = ("keras.ops.argmax/argmin on floats emit Bitcast and BitwiseAnd (a -0.0 fix): "
                "drop the argmax and serve the scores (clients take the top class, or ask the "
                "server's classification extension for it)")
_OP_HINTS = {
    "Bitcast": _ARGMAX_HINT,
    "BitwiseAnd": _ARGMAX_HINT,
    "ScaleAndTranslate": "ScaleAndTranslate is resizing with antialias=True: use "
                         "antialias=False, or resize the images before they reach the model",
}
_GENERIC_HINT = "remove the layer or replace it by layers tf2onnx converts"


class ConversionError(RuntimeError):
    """The model cannot be converted to ONNX; the message names the op, the layer and what
    to do."""


def to_onnx(model, *, opset: int = DEFAULT_OPSET, verbose: bool = False):
    """The ONNX ModelProto of a single-input Keras model, dynamic batch dimension.

    Graph inputs and outputs keep the Keras model's input and output names exactly, the
    outputs in the Keras model's order; constants are folded (see fold_constants).
    tf2onnx's log is shown only when ``verbose``. ConversionError when TensorFlow cannot
    trace the model, tf2onnx fails or leaves ops it cannot convert (the message names each
    op and the layer it comes from), or onnxruntime cannot load the result.
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
    _check_names(input_name, output_names)
    n_trainable = len(trainable)

    @tf.function(input_signature=[input_spec, *weight_specs])
    def forward(x, *weights):
        import keras

        outputs, _ = model.stateless_call(
            list(weights[:n_trainable]), list(weights[n_trainable:]), x, training=False
        )
        # A dict or nested structure flattens in the order model.outputs lists them.
        outputs = keras.tree.flatten(outputs)
        # Keyed by the Keras names, which tf2onnx gives the graph outputs (a Keras name
        # need not be a valid TensorFlow op name, so the ops keep TensorFlow's own).
        return {name: tf.identity(out) for name, out in zip(output_names, outputs, strict=True)}

    try:
        concrete = forward.get_concrete_function()
    except Exception as exc:
        raise ConversionError(
            f"TensorFlow cannot trace the model ({summary(exc)})"
        ) from exc
    # The traced function's outputs, by tensor name, in the order tf2onnx lists them.
    tf_names = {
        tensor.name: key for key, tensor in zip(
            sorted(concrete.structured_outputs), tf.nest.flatten(concrete.structured_outputs),
            strict=True)
    }
    # Tensors the model holds outside its variables (e.g. Normalization statistics given
    # to the constructor) are captured by the traced graph; tf2onnx leaves them as inputs.
    captured = {
        placeholder.name: value.numpy()
        for value, placeholder in zip(concrete.captured_inputs, concrete.graph.internal_captures,
                                      strict=True)
        if value.dtype != tf.resource
    }
    with _converter_log(verbose) as records:
        try:
            onnx_model, _ = tf2onnx.convert.from_function(
                forward, input_signature=[input_spec, *weight_specs], opset=opset,
                output_path=None,
            )
        except Exception as exc:
            raise ConversionError(_failure_message(model, records, exc)) from exc
    unconverted = unconverted_nodes(onnx_model, opset)
    if unconverted:
        raise ConversionError(unsupported_message(model, unconverted))
    weights = {f"{_WEIGHT_PREFIX}{i}": v.numpy() for i, v in enumerate(variables)}
    try:
        _inputs_to_initializers(onnx_model, input_name, weights, captured)
    except ValueError as exc:
        raise ConversionError(f"the converted graph is incomplete: {exc}") from exc
    del weights, captured
    _rename_outputs(onnx_model, output_names, tf_names)
    try:
        onnx_model = fold_constants(onnx_model)
    except Exception as exc:
        raise ConversionError(
            f"onnxruntime cannot load the converted model ({summary(exc)}); {VERBOSE_HINT}"
        ) from exc
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


def _check_names(input_name: str, output_names: list[str]) -> None:
    """Every output needs its own name, other than the input's: they name graph tensors."""
    seen: set[str] = set()
    for name in output_names:
        if name in seen:
            raise ConversionError(
                f"two outputs are named {name!r} (outputs: {', '.join(output_names)}): give "
                "each its own name, e.g. by passing each through a "
                "keras.layers.Identity(name=...)"
            )
        if name == input_name:
            raise ConversionError(f"output {name!r} has the input's name: rename the input "
                                  "or the output layer")
        seen.add(name)


def _rename_outputs(onnx_model, names: list[str], tf_names: dict[str, str]) -> None:
    """Name the graph outputs exactly as the Keras outputs, in the Keras order.

    tf2onnx names an output after the traced function's output key or after its graph
    tensor (``Identity:0``); ``tf_names`` maps the tensor names to the keys. Names are
    compared whole: ``aux_out`` is not ``out``. ConversionError if an output cannot be
    matched.
    """
    graph = onnx_model.graph
    by_name = {}
    for graph_output in graph.output:
        name = graph_output.name
        wanted = name if name in names else tf_names.get(name, tf_names.get(f"{name}:0"))
        if wanted is None or wanted in by_name:
            raise ConversionError(
                f"tf2onnx produced an output {name!r} that matches none of the model's "
                f"outputs ({', '.join(names)})"
            )
        if name != wanted:
            _rename_tensor(graph, name, wanted)
        by_name[wanted] = graph_output
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConversionError(f"tf2onnx dropped the outputs {', '.join(missing)}")
    ordered = [by_name[n] for n in names]
    del graph.output[:]
    graph.output.extend(ordered)


def _rename_tensor(graph, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph``; a tensor already called
    ``new`` is renamed out of the way first."""
    taken = ({t for node in graph.node for t in (*node.input, *node.output)}
             | {i.name for i in graph.initializer} | {i.name for i in graph.input})
    if new in taken:
        spare = next(f"{new}__{i}" for i in range(len(taken) + 1) if f"{new}__{i}" not in taken)
        _rename_tensor(graph, new, spare)
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for collection in (graph.output, graph.input, graph.value_info):
        for value_info in collection:
            if value_info.name == old:
                value_info.name = new
    for initializer in graph.initializer:
        if initializer.name == old:
            initializer.name = new


def keep_outputs(onnx_model, names: list[str]) -> None:
    """Drop every graph output but ``names``, in place (the nodes stay)."""
    outputs = [o for o in onnx_model.graph.output if o.name in names]
    del onnx_model.graph.output[:]
    onnx_model.graph.output.extend(outputs)


def summary(exc: BaseException) -> str:
    """``Type: message`` in one line, the line that says what went wrong: the innermost
    ``SomeError: ...`` line TensorFlow quotes if there is one, else the first line that is not
    a heading (``Graph execution error:``), a traceback or a TensorFlow node line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    inner = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    if inner:
        return inner[-1]
    telling = [line for line in lines if not line.endswith(":")
               and not line.startswith(("File ", "[[", "Detected at"))]
    return f"{type(exc).__name__}: {(telling or lines or ['no message'])[0]}"


class _Records(logging.Handler):
    """Keeps the log records it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _converter_log(verbose: bool) -> Iterator[list[logging.LogRecord]]:
    """Collect tf2onnx's log records; they reach the console only when ``verbose``."""
    logger = logging.getLogger("tf2onnx")
    handler = _Records()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = verbose
    if not verbose:
        logger.setLevel(logging.INFO)  # still record what it found, without showing it
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level


def _subgraphs(node) -> Iterator:
    from onnx import AttributeProto

    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def unconverted_nodes(onnx_model, opset: int) -> list[tuple[str, str]]:
    """(node name, op type) of every node that is not an ONNX op at ``opset``.

    tf2onnx does not fail on a TensorFlow op it cannot map: it logs it and leaves the
    TensorFlow node in the graph (e.g. ``Bitcast``), which no runtime can execute.
    Nodes of other domains (``com.microsoft``) are left to onnxruntime to judge.
    """
    import onnx

    found: list[tuple[str, str]] = []

    def visit(graph) -> None:
        for node in graph.node:
            if node.domain in ("", "ai.onnx"):
                try:
                    onnx.defs.get_schema(node.op_type, opset, "")
                except onnx.defs.SchemaError:
                    found.append((node.name, node.op_type))
            for subgraph in _subgraphs(node):
                visit(subgraph)

    visit(onnx_model.graph)
    return found


def unsupported_message(model, unconverted: list[tuple[str, str]]) -> str:
    """One line: each op tf2onnx cannot convert, the layer it comes from, what to do."""
    by_type: dict[str, list[str]] = {}
    for node_name, op_type in unconverted:
        by_type.setdefault(op_type, []).append(node_name)
    by_layers: dict[tuple[str, ...], list[str]] = {}
    for op_type, node_names in by_type.items():
        layers = tuple(layers_emitting(model, op_type, node_names))
        by_layers.setdefault(layers, []).append(op_type)
    parts = []
    for layers, op_types in by_layers.items():
        where = (f"from layer {', '.join(repr(n) for n in layers)}" if layers
                 else "its layer could not be identified")
        parts.append(f"{' and '.join(f'op {t}' for t in op_types)} ({where})")
    hints = list(dict.fromkeys(_OP_HINTS.get(t, _GENERIC_HINT) for t in by_type))
    return (f"tf2onnx cannot convert {'; '.join(parts)}: {'; '.join(hints)}; "
            f"{VERBOSE_HINT}")


def _failure_message(model, records: list[logging.LogRecord], exc: BaseException) -> str:
    """One line for an exception tf2onnx raised, naming the node(s) it failed on."""
    failed = [str(r.args[0]) for r in records if isinstance(r.msg, str)
              and r.msg.startswith("Failed to convert node") and r.args]
    where = ""
    if failed:
        layers = {layer for name in failed for layer in _layers_by_scope(model, name)}
        where = f" at node {', '.join(failed)}" + (
            f" (from layer {', '.join(repr(n) for n in sorted(layers))})" if layers else "")
    return (f"tf2onnx failed{where} ({summary(exc)}): "
            f"{_GENERIC_HINT}; {VERBOSE_HINT}")


def graph_nodes(model) -> list:
    """The call nodes of a functional model (Sequential: of its functional graph)."""
    graph = getattr(model, "_functional", None) or model
    by_depth = getattr(graph, "_nodes_by_depth", None) or {}
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]
            if node.operation is not None and not node.is_input]


def _layer_names(model, prefix: str = "") -> dict[str, str]:
    """Layer name -> its path from the top model, nested models included."""
    names: dict[str, str] = {}
    for node in graph_nodes(model):
        op = node.operation
        names.setdefault(op.name, prefix + op.name)
        if graph_nodes(op):
            for inner, path in _layer_names(op, f"{prefix}{op.name}/").items():
                names.setdefault(inner, path)
    return names


def _layers_by_scope(model, node_name: str) -> list[str]:
    """Layers named by a TensorFlow node's name scopes (``resizing/resize/Op``)."""
    names = _layer_names(model)
    for scope in reversed(node_name.split("/")[:-1]):
        if scope in names:
            return [names[scope]]
    return []


def _op_types(operation, node) -> set[str]:
    """TensorFlow op types one call of a Keras operation traces to."""
    import tensorflow as tf

    tensors = list(node.input_tensors)
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in tensors]

    @tf.function(input_signature=specs)
    def call(*xs):
        args, kwargs = node.arguments.fill_in({id(t): x for t, x in zip(tensors, xs,
                                                                         strict=True)})
        return operation(*args, **kwargs)

    graph = call.get_concrete_function().graph
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types.update(n.op for n in function.node_def)
    return types


def layers_emitting(model, op_type: str, node_names: list[str], prefix: str = "") -> list[str]:
    """Names of the layers whose computation contains TensorFlow op ``op_type``.

    First from the nodes' name scopes (layers open one named after themselves); failing
    that, each layer of the graph is traced on its own (plain ``keras.ops`` calls in a
    functional model open no scope). Nested models are searched inside. May be empty.
    """
    scoped = sorted({layer for name in node_names for layer in _layers_by_scope(model, name)})
    if scoped:
        return scoped
    found = []
    for node in graph_nodes(model):
        op = node.operation
        try:
            types = _op_types(op, node)
        except Exception:  # an operation that cannot be traced alone: not attributable
            continue
        if op_type in types:
            inner = layers_emitting(op, op_type, [], f"{prefix}{op.name}/") if graph_nodes(
                op) else []
            found.extend(inner or [prefix + op.name])
    return found
