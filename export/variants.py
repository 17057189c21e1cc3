"""Reduced-precision variants of an exported fp32 model: float16 and int8."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def to_fp16(onnx_model, keep_io_types: bool = True):
    """Weights and compute in float16; float32 inputs and outputs unless keep_io_types is off."""
    from onnxconverter_common import float16

    # The converter retypes a Cast from an integer graph input (uint8 pixels) to float16
    # but not the tensor it feeds; keeping that Cast in float32 sidesteps the mismatch.
    inputs = {i.name for i in onnx_model.graph.input}
    casts = [n.name for n in onnx_model.graph.node if n.op_type == "Cast" and n.input[0] in inputs]
    return float16.convert_float_to_float16(
        onnx_model, keep_io_types=keep_io_types, node_block_list=casts
    )


class _Calibration:
    """Feeds calibration batches to onnxruntime's static quantizer."""

    def __init__(self, input_name: str, samples: np.ndarray, batch_size: int = 16) -> None:
        whole = len(samples) - len(samples) % batch_size or len(samples)
        self._batches = iter(
            [{input_name: samples[i : i + batch_size]} for i in range(0, whole, batch_size)]
        )

    def get_next(self):
        return next(self._batches, None)


def to_int8(onnx_model, calibration: np.ndarray | None):
    """int8 weights (per channel) and activations.

    With calibration samples: static quantization (QDQ format), the activation ranges
    measured on those samples. Without: dynamic quantization (weights int8, activations
    quantized at run time). The classifier (the last MatMul/Gemm) stays in float32: it
    is small, and quantizing it costs the most top-1 agreement.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    reader_class = type("Calibration", (_Calibration, CalibrationDataReader), {})
    matmuls = [n.name for n in onnx_model.graph.node if n.op_type in ("MatMul", "Gemm")]
    exclude = matmuls[-1:]
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(onnx_model, str(source))
        if calibration is not None:
            input_name = onnx_model.graph.input[0].name
            quantize_static(
                str(source), str(target), reader_class(input_name, calibration),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
            )
        else:
            quantize_dynamic(str(source), str(target), per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        return onnx.load(str(target))
