"""The data plane's InferResult as a gRPC ModelInferResponse: every output as raw bytes,
except those written into shared memory: their tensor carries the shared memory parameters
(serving/shared_memory.py's ``output_parameters``) and their raw_output_contents entry is
empty, so entries stay aligned with outputs."""

from __future__ import annotations

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import encode_raw
from onnxserve.protos.datatypes import by_numpy
from onnxserve.serving.contract import InferResult
from onnxserve.serving.shared_memory import output_parameters


def encode_response(result: InferResult, request_id: str,
                    response: pb.ModelInferResponse | None = None) -> pb.ModelInferResponse:
    """The response for ``result``; ``request_id`` is the id the client sent ("" if none).
    ``response``: an empty message to fill (a stream answer's ``infer_response``, which
    then needs no copy) instead of a new one."""
    if response is None:
        response = pb.ModelInferResponse()
    response.model_name, response.model_version = result.model_name, result.model_version
    response.id = request_id
    placed = result.shared_memory
    for name, array in result.outputs:
        datatype = by_numpy(array.dtype)
        tensor = response.outputs.add(name=name, datatype=datatype.name, shape=array.shape)
        if placed is not None and name in placed:
            for key, value in output_parameters(placed[name]).items():
                if isinstance(value, str):
                    tensor.parameters[key].string_param = value
                else:
                    tensor.parameters[key].int64_param = value
            response.raw_output_contents.append(b"")
            continue
        response.raw_output_contents.append(encode_raw(array, datatype))
    return response
