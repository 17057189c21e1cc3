"""Build the ModelInferResponse: outputs as raw bytes, classification results as BYTES."""

from __future__ import annotations

import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import encode_raw
from onnxserve.protos.datatypes import by_numpy

from .classification import TopK, class_strings, top_k
from .model import Model


def encode_response(
    request: pb.ModelInferRequest,
    model: Model,
    version: int,
    names: list[str],
    outputs: dict[str, np.ndarray | TopK],
    classification: dict[str, int],
) -> pb.ModelInferResponse:
    """Build the response, with every output as raw_output_contents; classification
    outputs arrive as top-k numbers (batched models) or whole scores."""
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=str(version), id=request.id
    )
    batched = model.config.max_batch_size > 0
    for name in names:
        array = outputs[name]
        if isinstance(array, TopK):
            array = class_strings(array, model.labels.get(name), name)
        elif name in classification:
            array = top_k(array, classification[name], model.labels.get(name), batched=batched,
                          output=name)
        datatype = by_numpy(array.dtype)
        response.outputs.add(name=name, datatype=datatype.name, shape=array.shape)
        response.raw_output_contents.append(encode_raw(array, datatype))
    return response
