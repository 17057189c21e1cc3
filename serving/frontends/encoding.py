"""The data plane's InferResult as a gRPC ModelInferResponse: every output as raw bytes."""

from __future__ import annotations

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import encode_raw
from onnxserve.protos.datatypes import by_numpy
from onnxserve.serving.dataplane import InferResult


def encode_response(result: InferResult, request_id: str) -> pb.ModelInferResponse:
    """The response for ``result``; ``request_id`` is the id the client sent ("" if none)."""
    response = pb.ModelInferResponse(model_name=result.model_name,
                                     model_version=result.model_version, id=request_id)
    for name, array in result.outputs:
        datatype = by_numpy(array.dtype)
        response.outputs.add(name=name, datatype=datatype.name, shape=array.shape)
        response.raw_output_contents.append(encode_raw(array, datatype))
    return response
