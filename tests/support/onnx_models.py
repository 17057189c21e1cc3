"""Small ONNX models built in code for the tests (no TensorFlow needed)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

#: protocol datatype -> ONNX element type, for every type the echo model passes through
ECHO_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def save_model(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def echo_model(path: Path) -> Path:
    """Inputs in_<TYPE> [batch, 2] for every datatype, each copied to out_<TYPE>."""
    inputs, outputs, nodes = [], [], []
    for name, elem in ECHO_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return save_model(helper.make_graph(nodes, "echo", inputs, outputs), path)


def add_one_model(path: Path, size: int = 4) -> Path:
    """y = x + 1 on FP32 [batch, size]; also z = x * 2."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", size])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Add", ["x", "one"], ["y"]),
        helper.make_node("Mul", ["x", "two"], ["z"]),
    ]
    graph = helper.make_graph(nodes, "add_one", [x], [y, z], initializer=[one, two])
    return save_model(graph, path)


def scores_model(path: Path, classes: int = 5) -> Path:
    """Identity on FP32 [batch, classes]: lets tests choose the scores for classification."""
    x = helper.make_tensor_value_info("scores_in", TensorProto.FLOAT, ["batch", classes])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])
    graph = helper.make_graph([helper.make_node("Identity", ["scores_in"], ["scores"])],
                              "scores", [x], [y])
    return save_model(graph, path)


def channel_mean_model(path: Path, height: int = 8, width: int = 8) -> Path:
    """UINT8 images [batch, H, W, 3] -> FP32 per-channel means [batch, 3]."""
    x = helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", height, width, 3])
    y = helper.make_tensor_value_info("means", TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["means"], axes=[1, 2], keepdims=0),
    ]
    return save_model(helper.make_graph(nodes, "channel_mean", [x], [y]), path, opset=17)


def slow_model(path: Path, size: int = 1024, layers: int = 16) -> Path:
    """FP32 [batch, size] -> [batch, size] through ``layers`` MatMul+Tanh: a few ms a batch."""
    import numpy as np

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    init = [numpy_helper.from_array(weight, "w")]
    nodes, previous = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        previous = out
    return save_model(helper.make_graph(nodes, "slow", [x], [y], initializer=init), path)


def one_row_model(path: Path, size: int = 4) -> Path:
    """x FP32 [N, size] -> y = Relu(x) [N, size], and s declared [N, size] but really the
    first row only (Compress on axis 0): a model that cannot batch although it says so."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", size])
    keep = helper.make_tensor("keep", TensorProto.BOOL, [1], [True])
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Compress", ["x", "keep"], ["s"], axis=0),
    ]
    return save_model(helper.make_graph(nodes, "one_row", [x], [y, s], initializer=[keep]), path)


def variable_image_model(path: Path, classes: int = 4) -> Path:
    """Float images of any size [N, H, W, 3] -> [N, classes]: a 3x3 convolution
    without padding, global average pooling, as Keras' Input((None, None, 3)) exports."""
    import numpy as np

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", "H", "W", 3])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])
    weight = np.random.default_rng(0).standard_normal((classes, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["scores"])]
    graph = helper.make_graph(nodes, "variable_image", [x], [y],
                              initializer=[numpy_helper.from_array(weight, "w")])
    return save_model(graph, path)


def fixed_batch_model(path: Path) -> Path:
    """A model exported with a fixed batch of 1: x [1,3,32,32] -> per-channel means [1,3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)
    return save_model(helper.make_graph([node], "fixed", [x], [y]), path)


#: its Triton config: no batch dimension, the ONNX file's fixed batch of 1 by reshape
FIXED_CONFIG = """
max_batch_size: 0
input { name: "x" data_type: TYPE_FP32 dims: [3, 32, 32] reshape { shape: [1, 3, 32, 32] } }
output { name: "y" data_type: TYPE_FP32 dims: [3] reshape { shape: [1, 3] } }
model_transaction_policy { decoupled: false }
"""
