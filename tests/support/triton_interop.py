"""Drive an onnxserve server with the official tritonclient, unchanged; print JSON results.

Run in its own process: ``python triton_interop.py HOST:PORT``. tritonclient registers
the same ``inference.*`` protobuf names as onnxserve's modules, so the two cannot be
imported into one process.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(url: str) -> None:
    client = triton.InferenceServerClient(url)
    results: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("lenet5"),
        "unknown_model_ready": client.is_model_ready("no_such_model"),
    }
    server = client.get_server_metadata(as_json=True)
    results["server"] = {"name": server["name"], "extensions": server.get("extensions", [])}
    meta = client.get_model_metadata("lenet5", as_json=True)
    results["metadata"] = {
        "platform": meta["platform"],
        "inputs": [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
                   for t in meta["inputs"]],
        "outputs": [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
                    for t in meta["outputs"]],
    }
    config = client.get_model_config("lenet5", as_json=True)["config"]
    results["config_max_batch_size"] = int(config["max_batch_size"])

    images = np.load(sys.argv[2]) if len(sys.argv) > 2 else np.zeros((4, 28, 28, 1), np.float32)
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    response = client.infer("lenet5", [tensor])
    probs = response.as_numpy("probabilities")
    results["infer"] = {"shape": list(probs.shape), "argmax": probs.argmax(axis=1).tolist(),
                        "row_sums": probs.sum(axis=1).round(4).tolist()}

    top = triton.InferRequestedOutput("probabilities", class_count=3)
    response = client.infer("lenet5", [tensor], outputs=[top])
    results["classification"] = [[s.decode() for s in row] for row in response.as_numpy(
        "probabilities")]

    text = np.array([[b"hello", b""], [b"x", b"yz"]], dtype=object)
    echo_inputs = []
    for name, dtype in (("BOOL", bool), ("UINT8", np.uint8), ("UINT16", np.uint16),
                        ("UINT32", np.uint32), ("UINT64", np.uint64), ("INT8", np.int8),
                        ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
                        ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)):
        data = np.array([[1, 0], [0, 1]], dtype=dtype)
        t = triton.InferInput(f"in_{name}", [2, 2], name)
        t.set_data_from_numpy(data)
        echo_inputs.append(t)
    t = triton.InferInput("in_BYTES", [2, 2], "BYTES")
    t.set_data_from_numpy(text)
    echo_inputs.append(t)
    response = client.infer("echo", echo_inputs)
    results["echo_bytes"] = [[v.decode() for v in row] for row in response.as_numpy("out_BYTES")]
    results["echo_fp16"] = response.as_numpy("out_FP16").tolist()

    errors = {}
    for label, call in {
        "unknown_model": lambda: client.infer("no_such_model", [tensor]),
        "wrong_datatype": lambda: client.infer("lenet5", [_input("input", images, "FP64")]),
    }.items():
        try:
            call()
            errors[label] = None
        except InferenceServerException as exc:
            errors[label] = [exc.status(), exc.message()]
    results["errors"] = errors
    print(json.dumps(results))


def _input(name: str, array: np.ndarray, datatype: str):
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array.astype(np.float64))
    return tensor


if __name__ == "__main__":
    main(sys.argv[1])
