"""The front ends' codecs import and work without onnxruntime or the model lifecycle.

ARCHITECTURE.md: the data plane's value types live in a module that imports neither
onnxruntime nor the model lifecycle, so codecs (and a new transport) import cheaply. A
subprocess blocks onnxruntime, imports the gRPC and HTTP codecs, runs a request through each
and checks that nothing of the model lifecycle (dataplane.py, models/, batching/, runtime/)
was imported on the way: an import guarded by ``try`` would not fail, but would still show.
"""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys

sys.modules["onnxruntime"] = None  # any import of onnxruntime now raises ImportError

import json

import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.serving.contract import InferResult
from onnxserve.serving.frontends import decoding, encoding, http_codec

request = pb.ModelInferRequest(model_name="m", id="r1")
request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
request.raw_input_contents.append(np.array([[1.5, 2.5]], np.float32).tobytes())
values = decoding.infer_request(request, None).inputs[0].decode()
answer = encoding.encode_response(InferResult("m", "1", "r1", [("y", values)]), "r1")
print(answer.model_name, answer.outputs[0].shape, np.frombuffer(answer.raw_output_contents[0],
                                                                np.float32).tolist())

header = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [3, 4]}]}
parsed = http_codec.infer_request(header, memoryview(b""), "m", "")
result = InferResult("m", "1", "r2", [("y", parsed.request.inputs[0].decode())])
body, chunks = http_codec.infer_response(result, "r2", lambda name: False)
print(json.loads(body)["outputs"][0]["data"], chunks)

lifecycle = ("onnxserve.serving.dataplane", "onnxserve.serving.models",
             "onnxserve.serving.batching", "onnxserve.serving.runtime")
print(sorted(m for m in sys.modules if m.startswith(lifecycle)))
"""


def test_the_codecs_import_and_work_without_onnxruntime() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["m [1, 2] [1.5, 2.5]", "[3, 4] []", "[]"]
