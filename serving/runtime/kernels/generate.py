"""Write the ONNX graphs in this folder: ``python -m onnxserve.serving.runtime.kernels.generate``.

``topk_<dtype>.onnx`` takes ``scores`` [batch, classes] and ``k`` (int64 [1]) and returns each
sample's ``k`` best ``values`` and their flat ``indices``, best first. Run on a model's own
device against its output, it sends k numbers per sample back to the host instead of the
whole score vector. The files are committed (the server does not depend on the onnx
package); tests/unit/runtime/test_gpu_path.py regenerates them and compares.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

FOLDER = Path(__file__).resolve().parent
TOPK_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
              "float64": TensorProto.DOUBLE}
#: opset 13 and IR version 7 load on every onnxruntime the project supports
OPSET = 13
IR_VERSION = 7


def topk_model(element_type: int) -> onnx.ModelProto:
    """The top-k graph for one element type."""
    nodes = [
        helper.make_node("TopK", ["scores", "k"], ["values", "indices"], axis=1, largest=1,
                         sorted=1),
    ]
    graph = helper.make_graph(
        nodes, "onnxserve_topk",
        [helper.make_tensor_value_info("scores", element_type, ["batch", "classes"]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("values", element_type, ["batch", "k"]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "k"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxserve")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def expected_files() -> dict[str, bytes]:
    """Every generated file's name and contents."""
    return {f"topk_{name}.onnx": topk_model(element_type).SerializeToString()
            for name, element_type in TOPK_TYPES.items()}


def main() -> None:
    for name, data in expected_files().items():
        (FOLDER / name).write_bytes(data)
        print(f"wrote {FOLDER / name}")


if __name__ == "__main__":
    main()
