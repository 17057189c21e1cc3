"""Drive onnxserve's system shared memory with the official tritonclient, unchanged: regions
made by tritonclient.utils.shared_memory, tensors in and out of them; print JSON results.

Run in its own process (see triton_interop.py): ``python triton_shm_interop.py HOST:PORT``.
Uses the test repository's add_one (x FP32 [N, 4] -> y = x + 1, z = 2x) and echo models.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException

ECHO_TYPES = {"BOOL": bool, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
              "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
              "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def _error(call: Callable[[], object]) -> list[str] | None:
    try:
        call()
    except InferenceServerException as exc:
        return [str(exc.status()), exc.message()]
    return None


def main(url: str) -> None:
    client = triton.InferenceServerClient(url)
    tag = os.getpid()
    in_key, out_key = f"/onnxserve_in_{tag}", f"/onnxserve_out_{tag}"
    in_handle = shm.create_shared_memory_region("in", in_key, 4096)
    out_handle = shm.create_shared_memory_region("out", out_key, 4096)
    results: dict = {"keys": [in_key, out_key]}
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        shm.set_shared_memory_region(in_handle, [x])
        shm.set_shared_memory_region(in_handle, [x * 10], offset=64)
        client.register_system_shared_memory("in", in_key, 4096)
        client.register_system_shared_memory("out", out_key, 2048, offset=1024)
        results["status"] = client.get_system_shared_memory_status(as_json=True)
        results["status_out"] = client.get_system_shared_memory_status("out", as_json=True)

        # add_one: x from "in" (offset 0, then 64); y into "out" at offset 16; z as raw bytes.
        for offset in (0, 64):
            tensor = triton.InferInput("x", [2, 4], "FP32")
            tensor.set_shared_memory("in", 32, offset=offset)
            y = triton.InferRequestedOutput("y")
            y.set_shared_memory("out", 32, offset=16)
            response = client.infer("add_one", [tensor],
                                    outputs=[y, triton.InferRequestedOutput("z")])
            # (get_output's as_json returns None in this tritonclient: convert here)
            output = MessageToDict(response.get_output("y"), preserving_proto_field_name=True)
            results[f"add_one_{offset}"] = {
                "y": shm.get_contents_as_numpy(out_handle, np.float32, [2, 4],
                                               offset=1024 + 16).tolist(),
                "z": response.as_numpy("z").tolist(),
                "y_output": {"datatype": output["datatype"],
                             "shape": [int(d) for d in output["shape"]],
                             "parameters": output.get("parameters", {})},
            }

        # echo: BYTES and INT32 from "in", the other inputs raw (raw entries only for
        # those); out_BYTES and out_FP16 into "out", the others raw.
        text = np.array([[b"hello", b""], [b"x", b"yz"]], dtype=object)
        serialized = triton.serialize_byte_tensor(text)
        ints = np.array([[1, -2], [3, -4]], dtype=np.int32)
        shm.set_shared_memory_region(in_handle, [serialized], offset=256)
        shm.set_shared_memory_region(in_handle, [ints], offset=512)
        inputs = []
        for name, dtype in ECHO_TYPES.items():
            tensor = triton.InferInput(f"in_{name}", [2, 2], name)
            if name == "INT32":
                tensor.set_shared_memory("in", ints.nbytes, offset=512)
            else:
                tensor.set_data_from_numpy(np.array([[1, 0], [0, 1]], dtype=dtype))
            inputs.append(tensor)
        tensor = triton.InferInput("in_BYTES", [2, 2], "BYTES")
        tensor.set_shared_memory("in", len(serialized.item()), offset=256)
        inputs.append(tensor)
        outputs = [triton.InferRequestedOutput(f"out_{name}") for name in ECHO_TYPES]
        outputs[list(ECHO_TYPES).index("FP16")].set_shared_memory("out", 8, offset=0)
        text_out = triton.InferRequestedOutput("out_BYTES")
        text_out.set_shared_memory("out", 256, offset=512)
        response = client.infer("echo", inputs, outputs=[*outputs, text_out])
        written = MessageToDict(response.get_output("out_BYTES"),
                                preserving_proto_field_name=True)["parameters"]
        results["echo"] = {
            "bytes": [[v.decode() for v in row] for row in shm.get_contents_as_numpy(
                out_handle, np.object_, [2, 2], offset=1024 + 512)],
            "bytes_parameters": written,
            "fp16": shm.get_contents_as_numpy(out_handle, np.float16, [2, 2],
                                              offset=1024).tolist(),
            "int32": response.as_numpy("out_INT32").tolist(),
            "fp64": response.as_numpy("out_FP64").tolist(),
            "bool": response.as_numpy("out_BOOL").tolist(),
        }

        def infer_x(region: str, byte_size: int, offset: int = 0,
                    output: tuple[str, int, int] | None = None) -> object:
            tensor = triton.InferInput("x", [2, 4], "FP32")
            tensor.set_shared_memory(region, byte_size, offset=offset)
            outputs = None
            if output is not None:
                y = triton.InferRequestedOutput("y")
                y.set_shared_memory(*output)
                outputs = [y]
            return client.infer("add_one", [tensor], outputs=outputs)

        results["errors"] = {
            "unregistered_region": _error(lambda: infer_x("nope", 32)),
            "offset_past_region": _error(lambda: infer_x("in", 32, offset=4090)),
            "size_not_tensor": _error(lambda: infer_x("in", 16)),
            "output_too_small": _error(lambda: infer_x("in", 32, output=("out", 16, 0))),
            "output_past_region": _error(lambda: infer_x("in", 32, output=("out", 32, 2040))),
            "duplicate": _error(lambda: client.register_system_shared_memory(
                "in", in_key, 64)),
            "bad_key": _error(lambda: client.register_system_shared_memory(
                "evil", "/../../etc/passwd", 64)),
            "missing_key": _error(lambda: client.register_system_shared_memory(
                "ghost", f"/onnxserve_no_such_key_{tag}", 64)),
            "past_object": _error(lambda: client.register_system_shared_memory(
                "big", in_key, 4096, offset=8)),
            "status_unknown": _error(lambda: client.get_system_shared_memory_status("nope")),
            "cuda_register": _error(lambda: client.register_cuda_shared_memory(
                "gpu", b"\0" * 64, 0, 64)),
            "cuda_status": _error(lambda: client.get_cuda_shared_memory_status()),
        }
        client.unregister_system_shared_memory("in")
        results["after_unregister_in"] = client.get_system_shared_memory_status(as_json=True)
        results["errors"]["unregistered_after"] = _error(lambda: infer_x("in", 32))
        client.unregister_system_shared_memory("never_registered")  # no error, as Triton
        client.unregister_system_shared_memory()
        results["after_unregister_all"] = client.get_system_shared_memory_status(as_json=True)
        # The server keeps one region for the test to see unmapped at exit.
        client.register_system_shared_memory("kept", out_key, 64)
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
