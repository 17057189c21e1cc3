"""Turn a ModelInferRequest into numpy inputs and per-request options, validated.

Input tensors are decoded as zero-copy views of the message's raw bytes; every check names
the input, what the model expects and what the request sent.
"""

from __future__ import annotations

import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import TensorCodecError, datatype_of, decode_contents, decode_raw

from .errors import InvalidInputError
from .model import Model

CLASSIFICATION_PARAMETER = "classification"
TIMEOUT_PARAMETER = "timeout"


def parameter_value(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def decode_inputs(request: pb.ModelInferRequest, model: Model) -> tuple[dict[str, np.ndarray], int]:
    """Validate and decode the request's input tensors; return them and the batch size."""
    declared = [(t.name, t.datatype, tuple(t.shape)) for t in request.inputs]
    batch_size = model.rules.check(declared)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(request.inputs)} inputs; send one per input, in order"
        )
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        has_contents = tensor.HasField("contents") and bool(tensor.contents.ListFields())
        try:
            datatype = datatype_of(tensor.datatype)
            if raw:
                if has_contents:
                    raise TensorCodecError(
                        "has both contents and raw_input_contents; use one or the other"
                    )
                tensors[tensor.name] = decode_raw(raw[i], datatype, tensor.shape)
            else:
                tensors[tensor.name] = decode_contents(tensor.contents, datatype, tensor.shape)
        except TensorCodecError as exc:
            raise InvalidInputError(f"input {tensor.name!r}: {exc}") from None
    return tensors, batch_size


def timeout_parameter(request: pb.ModelInferRequest) -> int | None:
    """The request's own queue timeout in microseconds (Triton's "timeout" parameter)."""
    if TIMEOUT_PARAMETER not in request.parameters:
        return None
    value = parameter_value(request.parameters[TIMEOUT_PARAMETER])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"parameter 'timeout' must be a whole number of microseconds >= 0, got {value!r}")
    return value


def classification_counts(request: pb.ModelInferRequest) -> dict[str, int]:
    counts: dict[str, int] = {}
    for output in request.outputs:
        if CLASSIFICATION_PARAMETER in output.parameters:
            value = parameter_value(output.parameters[CLASSIFICATION_PARAMETER])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(
                    f"output {output.name!r}: parameter 'classification' must be an integer "
                    f">= 1, got {value!r}"
                )
            counts[output.name] = value
    return counts
