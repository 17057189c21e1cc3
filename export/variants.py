"""Reduced-precision variants of an exported fp32 model: float16 and int8.

float16 (``to_fp16``) is a GPU format: onnxruntime's CPU kernels compute most float16
operators by casting to float32 and back, so on the CPU it is no faster than fp32 (only
half the size).

int8 (``to_int8``) follows onnxruntime's guide to quantizing ONNX models
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html and
``quantize_static``'s "Choosing parameters for CPU inference"):

1. pre-processing (``quant_pre_process``): symbolic shape inference (when sympy is
   installed; onnxruntime names it for transformers, and ONNX shape inference covers
   CNNs), onnxruntime's graph optimisation (e.g. Conv + BatchNormalization folded), ONNX
   shape inference;
2. static quantization in the QDQ format with uint8 activations and int8 weights (U8S8),
   per-channel, symmetric weight scales: onnxruntime's CPU provider fuses each
   DequantizeLinear -> op -> QuantizeLinear group into an integer kernel (QLinearConv,
   QLinearAdd, ...), and zero weight zero points select its symmetric convolution kernels
   (AVX2, AVX-512 and VNNI on x86). Measured on MobileNetV2 with onnxruntime 1.32 on an
   AVX-512 VNNI CPU: int8 activations (S8S8) left 15 of the 52 convolutions and every
   residual Add in float between QuantizeLinear/DequantizeLinear pairs, 4.3 ms of
   operator time at batch 1 against U8S8's 2.3 ms (5.2 ms with symmetric int8
   activations, which also keep every ReLU6 as a float Clip), while QOperator (the integer
   operators written directly) ran within 2% of QDQ, the format onnxruntime recommends;
3. activation ranges calibrated on representative data (MinMax: measured against Entropy
   and Percentile, see CALIBRATION_METHODS);
4. ``reduce_range`` (7-bit weights) only on x86 CPUs without VNNI, where onnxruntime's
   U8S8 kernels can saturate; with VNNI it is not needed;
5. the classifier (the last MatMul/Gemm) and Softmax stay in float32 (FLOAT_OP_TYPES):
   an int8 classifier saved 0.1 ms of MobileNetV2's batch 1 and cost agreement (see
   CALIBRATION_METHODS).

Where the gain stops (same measurements, per node, one thread): onnxruntime's int8
pointwise (1x1) convolutions run 2.6-3.6x faster than its fp32 ones, its int8 depthwise
convolutions only 1.2-1.6x, and a convolution on 3 input channels (an RGB stem) takes the
general int8 GEMM path (the symmetric kernels want a multiple of 4 channels), 2.5x slower
than fp32 for MobileNetV2's 3x3 stem. Keeping that stem in float, or padding its input to
4 channels, saved nothing overall: the layout changes and quantization around it cost
what it saved. So MobileNetV2 (depthwise-heavy) gains about 2x and ResNet50 about 3x.

Without calibration data (your own model: its inputs are unknown here) the model is
quantized dynamically: weights int8, activations quantized at run time; onnxruntime runs
that with integer convolutions fed by a quantization per call, which is often slower than
fp32 on the CPU (the export measures it, see pipeline.export's ``force``).
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .convert import PROTOBUF_LIMIT
from .cpu import Cpu, this_cpu

#: Operator types int8 leaves in float32, besides the classifier: Softmax's exponentials
#: are cheap in float and lose the small probabilities in 8 bits.
FLOAT_OP_TYPES = ("Softmax",)
#: onnxruntime's calibration methods, by the name the report uses. Measured top-1
#: agreement with fp32 on held-out data, 256 calibration samples: lenet5 (scikit-learn
#: digits, 359 images) 100.0% with each method; cifar10_cnn (3 epochs on the report's
#: synthetic stand-in, 500 images) 99.0% with each (98.8% with MinMax and the classifier
#: quantized too). They agree, and MinMax needs no histograms, which for the 224x224
#: applications hold every activation of every calibration sample in memory.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION = "minmax"
#: Samples per calibration batch (each batch is one onnxruntime run of the model with
#: every activation as an output).
CALIBRATION_BATCH = 8


class QuantizationError(RuntimeError):
    """The int8 variant cannot be made; the message says why and what was expected."""


def to_fp16(onnx_model, keep_io_types: bool = True):
    """Weights and compute in float16; float32 inputs and outputs unless keep_io_types is off.

    A GPU format: on the CPU, onnxruntime computes most float16 operators in float32 (see
    the module docstring), so expect fp32's latency at half the size.
    """
    from onnxconverter_common import float16

    # The converter retypes a Cast from an integer graph input (uint8 pixels) to float16
    # but not the tensor it feeds; keeping that Cast in float32 sidesteps the mismatch.
    inputs = {i.name for i in onnx_model.graph.input}
    casts = [n.name for n in onnx_model.graph.node if n.op_type == "Cast" and n.input[0] in inputs]
    return float16.convert_float_to_float16(
        onnx_model, keep_io_types=keep_io_types, node_block_list=casts
    )


@dataclass(frozen=True)
class Int8Settings:
    """How the int8 variant is quantized (see the module docstring for why)."""

    #: "QDQ" (QuantizeLinear/DequantizeLinear around float ops, fused by onnxruntime) or
    #: "QOperator" (QLinearConv etc. written directly)
    quant_format: str = "QDQ"
    #: "uint8" or "int8"
    activations: str = "uint8"
    #: "int8" or "uint8"
    weights: str = "int8"
    per_channel: bool = True
    #: 7-bit weights (for x86 CPUs without VNNI); None: decided from the CPU
    reduce_range: bool | None = None
    #: one of CALIBRATION_METHODS
    calibration: str = DEFAULT_CALIBRATION


@dataclass
class Int8Variant:
    """An int8 model and how it was made."""

    model: object
    #: "static" (calibrated activation ranges) or "dynamic" (ranges computed per call)
    quantization: str
    settings: Int8Settings
    reduce_range: bool
    #: nodes of the pre-processed graph left in float32, by name
    float_nodes: list[str]
    calibration_samples: int
    #: what quant_pre_process did
    preprocessing: str
    cpu: Cpu
    #: how the calibration data was made (pipeline.Prepared.calibration_source)
    calibration_source: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """The report's ``int8`` section."""
        out: dict = {
            "quantization": self.quantization,
            "preprocessing": self.preprocessing,
            "weights": f"{self.settings.weights}, per "
                       + ("channel" if self.settings.per_channel else "tensor"),
            "reduce_range": self.reduce_range,
            "float_nodes": self.float_nodes,
            "cpu": str(self.cpu),
        }
        if self.quantization == "static":
            out.update({
                "format": self.settings.quant_format,
                "activations": f"{self.settings.activations}, calibrated",
                "calibration": {"method": self.settings.calibration,
                                "samples": self.calibration_samples,
                                "data": self.calibration_source},
            })
        else:
            out["activations"] = "quantized at run time (dynamic)"
        return out


class _Calibration:
    """Feeds calibration batches of ``samples`` ([samples, *input shape]) to onnxruntime's
    static quantizer, CALIBRATION_BATCH at a time; ``fed`` counts the samples handed out."""

    def __init__(self, input_name: str, samples: np.ndarray,
                 batch_size: int = CALIBRATION_BATCH) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)])
        self._input_name = input_name
        self.fed = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.fed += len(batch)
        return {self._input_name: batch}


def classifier_nodes(onnx_model) -> list[str]:
    """The classifier: the last MatMul or Gemm node in graph order (none when there is
    none), by name."""
    matmuls = [n.name for n in onnx_model.graph.node if n.op_type in ("MatMul", "Gemm")]
    return matmuls[-1:]


def float_nodes(onnx_model) -> list[str]:
    """Nodes to_int8 leaves in float32, by name: the classifier, then every node of
    FLOAT_OP_TYPES."""
    names = classifier_nodes(onnx_model)
    names += [n.name for n in onnx_model.graph.node
              if n.op_type in FLOAT_OP_TYPES and n.name not in names]
    return names


def _name_nodes(onnx_model) -> None:
    """Give every unnamed node a unique name (nodes_to_exclude selects by name)."""
    taken = {n.name for n in onnx_model.graph.node}
    for index, node in enumerate(onnx_model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _save(onnx_model, path: Path) -> bool:
    """Write the model; over 2 GB with its weights in a side file. True when it is large."""
    import onnx

    large = onnx_model.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(onnx_model, str(path), save_as_external_data=large,
                    location=path.name + ".data" if large else None)
    return large


def pre_process(source: Path, target: Path, *, large: bool = False) -> str:
    """onnxruntime's pre-processing before quantization (quant_pre_process) of the model
    file ``source`` into ``target``; returns what it did, in words. Symbolic shape
    inference runs when sympy is installed; onnxruntime's graph optimisation is skipped for
    models over 2 GB (``large``), which it cannot write."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    symbolic = importlib.util.find_spec("sympy") is not None
    quant_pre_process(
        str(source), str(target), skip_symbolic_shape=not symbolic, skip_optimization=large,
        save_as_external_data=large, all_tensors_to_one_file=True,
        external_data_location=target.name + ".data",
    )
    steps = ["symbolic shape inference" if symbolic else None,
             None if large else "onnxruntime graph optimisation", "ONNX shape inference"]
    text = "quant_pre_process: " + ", ".join(s for s in steps if s)
    if not symbolic:
        text += " (symbolic shape inference skipped: sympy is not installed)"
    if large:
        text += " (graph optimisation skipped: the model is over 2 GB)"
    return text


def to_int8(onnx_model, calibration: np.ndarray | None, *,
            settings: Int8Settings | None = None, calibration_source: str = "",
            machine: Cpu | None = None) -> Int8Variant:
    """The int8 variant of ``onnx_model`` (a single-input fp32 ModelProto); see the module
    docstring for the recipe.

    ``calibration``: representative inputs, [samples, *input shape] in the input's dtype,
    for static quantization; None: dynamic quantization. ``machine``: the CPU to choose
    ``reduce_range`` for (default this one). QuantizationError for an unknown setting or
    empty calibration data; onnxruntime's own errors pass through.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    settings = settings or Int8Settings()
    machine = machine or this_cpu()
    formats = {"QDQ": QuantFormat.QDQ, "QOperator": QuantFormat.QOperator}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    for what, value, known in (("format", settings.quant_format, formats),
                               ("activations", settings.activations, types),
                               ("weights", settings.weights, types),
                               ("calibration", settings.calibration, methods)):
        if value not in known:
            raise QuantizationError(f"int8 {what} {value!r}: expected one of "
                                    f"{', '.join(known)}")
    if calibration is not None and len(calibration) == 0:
        raise QuantizationError("int8 calibration data is empty: expected at least one "
                                "sample, [samples, *input shape]")
    reduce_range = (settings.reduce_range if settings.reduce_range is not None
                    else machine.x86 and not machine.vnni)
    with tempfile.TemporaryDirectory() as tmp:
        source, pre, target = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "pre", "int8"))
        named = onnx.ModelProto()
        named.CopyFrom(onnx_model)
        _name_nodes(named)
        large = _save(named, source)
        del named
        preprocessing = pre_process(source, pre, large=large)
        prepared = onnx.load(str(pre), load_external_data=False)
        excluded = float_nodes(prepared)
        input_name = prepared.graph.input[0].name
        del prepared
        if calibration is not None:
            reader = type("Calibration", (_Calibration, _reader_base()), {})(
                input_name, calibration)
            quantize_static(
                str(pre), str(target), reader,
                quant_format=formats[settings.quant_format],
                per_channel=settings.per_channel, reduce_range=reduce_range,
                activation_type=types[settings.activations],
                weight_type=types[settings.weights],
                calibrate_method=methods[settings.calibration],
                nodes_to_exclude=excluded, use_external_data_format=large,
                extra_options={"ActivationSymmetric": settings.activations == "int8",
                               "WeightSymmetric": True},
            )
            samples = reader.fed
        else:
            quantize_dynamic(str(pre), str(target), per_channel=settings.per_channel,
                             reduce_range=reduce_range, weight_type=types[settings.weights],
                             nodes_to_exclude=excluded, use_external_data_format=large)
            samples = 0
        model = onnx.load(str(target))
    return Int8Variant(
        model=model, quantization="static" if calibration is not None else "dynamic",
        settings=settings, reduce_range=reduce_range, float_nodes=excluded,
        calibration_samples=samples, preprocessing=preprocessing, cpu=machine,
        calibration_source=calibration_source if calibration is not None else "",
    )


def _reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader
