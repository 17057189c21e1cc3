"""A gRPC ModelInferRequest as the data plane's InferRequest: tensors decoded on demand as
zero-copy views of the message's raw bytes (or its typed contents)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import TensorCodecError, datatype_of, decode_contents, decode_raw
from onnxserve.serving.dataplane import (
    CLASSIFICATION_PARAMETER,
    TIMEOUT_PARAMETER,
    InferRequest,
    RequestedOutput,
    RequestInput,
)


def parameter_value(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def _decoder(request: pb.ModelInferRequest, index: int) -> Callable[[], np.ndarray]:
    tensor = request.inputs[index]

    def decode() -> np.ndarray:
        datatype = datatype_of(tensor.datatype)
        has_contents = tensor.HasField("contents") and bool(tensor.contents.ListFields())
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise TensorCodecError(
                f"raw_input_contents has {len(raw)} entries but the request has "
                f"{len(request.inputs)} inputs; send one per input, in order")
        if raw:
            if has_contents:
                raise TensorCodecError(
                    "has both contents and raw_input_contents; use one or the other")
            return decode_raw(request.raw_input_contents[index], datatype, tensor.shape)
        return decode_contents(tensor.contents, datatype, tensor.shape)

    return decode


def infer_request(request: pb.ModelInferRequest,
                  time_remaining: float | None) -> InferRequest:
    """The data plane's request for a ModelInferRequest; nothing is decoded (or checked)
    until the data plane calls each input's ``decode``."""
    inputs = [RequestInput(t.name, t.datatype, tuple(t.shape), _decoder(request, i))
              for i, t in enumerate(request.inputs)]
    outputs = [
        RequestedOutput(o.name, parameter_value(o.parameters[CLASSIFICATION_PARAMETER])
                        if CLASSIFICATION_PARAMETER in o.parameters else None)
        for o in request.outputs]
    timeout = (parameter_value(request.parameters[TIMEOUT_PARAMETER])
               if TIMEOUT_PARAMETER in request.parameters else None)
    return InferRequest(request.model_name, request.model_version, inputs, outputs,
                        request.id, timeout, time_remaining)
