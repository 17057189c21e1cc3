"""tritonclient.grpc calls for the tests, run in a process of their own: tritonclient's
generated modules and onnxserve's register the same proto file names, which one process's
descriptor pool refuses.

Usage: python triton_grpc_calls.py URL CALLS [--when-told], CALLS a JSON list of objects,
each with "op":
- "infer": "model", "input", "output", "shape" (float32 zeros), optional "version",
  "request_id", "headers" (gRPC metadata);
- "get_trace_settings": optional "model";
- "update_trace_settings": optional "model", "settings" (values: a string, a list of strings
  or null);
and optional "channel_args" ([[name, value], ...], tritonclient's). Prints a JSON list with a
result per call: {"ok": true, ...} or {"ok": false, "status": ..., "message": ...}. With
--when-told it prints "ready" once its clients are made and calls when a line comes on its
standard input (so that a test can time the calls to the millisecond).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def _settings(answer: dict[str, Any]) -> dict[str, list[str]]:
    return {key: list(value.get("value", [])) for key, value in answer["settings"].items()}


def call(client: triton.InferenceServerClient, spec: dict[str, Any]) -> dict[str, Any]:
    op = spec["op"]
    if op == "infer":
        data = np.zeros(spec["shape"], np.float32)
        tensor = triton.InferInput(spec["input"], list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer(spec["model"], [tensor], model_version=spec.get("version", ""),
                              request_id=spec.get("request_id", ""),
                              headers=spec.get("headers"))
        return {"ok": True, "shape": list(result.as_numpy(spec["output"]).shape)}
    if op == "get_trace_settings":
        return {"ok": True, "settings": _settings(client.get_trace_settings(
            model_name=spec.get("model"), as_json=True))}
    if op == "update_trace_settings":
        return {"ok": True, "settings": _settings(client.update_trace_settings(
            model_name=spec.get("model"), settings=spec["settings"], as_json=True))}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    url, calls = sys.argv[1], json.loads(sys.argv[2])
    clients: dict[str, triton.InferenceServerClient] = {}
    for spec in calls:
        args = spec.get("channel_args")
        key = json.dumps(args)
        if key not in clients:
            clients[key] = triton.InferenceServerClient(
                url, channel_args=[tuple(a) for a in args] if args else None)
            clients[key].is_server_live()  # connected before any timed call
    if "--when-told" in sys.argv[3:]:
        print("ready", flush=True)
        sys.stdin.readline()
    results = []
    for spec in calls:
        key = json.dumps(spec.get("channel_args"))
        try:
            results.append(call(clients[key], spec))
        except InferenceServerException as exc:
            results.append({"ok": False, "status": exc.status(), "message": exc.message()})
    for client in clients.values():
        client.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
