"""A gRPC ModelInferRequest as the data plane's InferRequest: tensors decoded on demand as
zero-copy views of the message's raw bytes (or its typed contents); tensors with Triton's
shared memory parameters pass them on (serving/shared_memory.py), and then
raw_input_contents holds one entry per input not in shared memory, in order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import TensorCodecError, datatype_of, decode_contents, decode_raw
from onnxserve.serving.contract import (
    CLASSIFICATION_PARAMETER,
    TIMEOUT_PARAMETER,
    InferRequest,
    RequestedOutput,
    RequestInput,
)
from onnxserve.serving.shared_memory import (
    SharedMemoryParameters,
    in_region,
    shared_memory_parameters,
)


def parameter_value(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def _decoder(request: pb.ModelInferRequest, index: int, shape: tuple[int, ...],
             raw_index: int | None = None,
             raw_count: int | None = None) -> Callable[[], np.ndarray]:
    """Input ``index``'s decoder (``shape``: its shape); its raw data is entry ``raw_index``
    of ``raw_count`` (when inputs in shared memory have none; default: ``index`` of every
    input)."""
    tensor = request.inputs[index]

    def decode() -> np.ndarray:
        datatype = datatype_of(tensor.datatype)
        raw = request.raw_input_contents
        if not raw:
            return decode_contents(tensor.contents, datatype, shape)
        expected = len(request.inputs) if raw_count is None else raw_count
        if len(raw) != expected:
            placed = "" if raw_count is None else " not in shared memory"
            raise TensorCodecError(
                f"raw_input_contents has {len(raw)} entries but the request has "
                f"{expected} inputs{placed}; send one per input{placed}, in order")
        if tensor.HasField("contents") and tensor.contents.ListFields():
            raise TensorCodecError(
                "has both contents and raw_input_contents; use one or the other")
        return decode_raw(raw[index if raw_index is None else raw_index], datatype, shape)

    return decode


def _shared_memory(tensor: pb.ModelInferRequest.InferInputTensor
                   | pb.ModelInferRequest.InferRequestedOutputTensor,
                   with_data: bool = False) -> SharedMemoryParameters | None:
    return shared_memory_parameters(
        {key: parameter_value(value) for key, value in tensor.parameters.items()}, with_data)


def _placed_inputs(request: pb.ModelInferRequest) -> list[RequestInput]:
    """The inputs of a request whose inputs have parameters (shared memory, or ignored)."""
    placements = [_shared_memory(t, t.HasField("contents") and bool(t.contents.ListFields()))
                  for t in request.inputs]
    raw_count = sum(p is None for p in placements)
    inputs, raw_index = [], 0
    for index, (tensor, placed) in enumerate(zip(request.inputs, placements, strict=True)):
        shape = tuple(tensor.shape)
        if placed is None:
            decode = _decoder(request, index, shape, raw_index, raw_count)
            raw_index += 1
        else:
            decode = in_region
        inputs.append(RequestInput(tensor.name, tensor.datatype, shape, decode, placed))
    return inputs


def _requested_output(output: pb.ModelInferRequest.InferRequestedOutputTensor
                      ) -> RequestedOutput:
    parameters = output.parameters
    classification = (parameter_value(parameters[CLASSIFICATION_PARAMETER])
                      if CLASSIFICATION_PARAMETER in parameters else None)
    return RequestedOutput(output.name, classification, _shared_memory(output))


def infer_request(request: pb.ModelInferRequest,
                  time_remaining: float | None) -> InferRequest:
    """The data plane's request for a ModelInferRequest; nothing is decoded (or checked)
    until the data plane calls each input's ``decode``."""
    tensors = request.inputs
    inputs = []
    for index, tensor in enumerate(tensors):
        if tensor.parameters:
            inputs = _placed_inputs(request)
            break
        shape = tuple(tensor.shape)
        inputs.append(RequestInput(tensor.name, tensor.datatype, shape,
                                   _decoder(request, index, shape)))
    outputs = [_requested_output(o) if o.parameters else RequestedOutput(o.name)
               for o in request.outputs]
    timeout = (parameter_value(request.parameters[TIMEOUT_PARAMETER])
               if TIMEOUT_PARAMETER in request.parameters else None)
    return InferRequest(request.model_name, request.model_version, inputs, outputs,
                        request.id, timeout, time_remaining)
