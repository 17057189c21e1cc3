"""Drive an onnxserve server's ModelStreamInfer, LogSettings and TraceSetting with the
official tritonclient, unchanged; print JSON results.

``python triton_stream_interop.py HOST:PORT [stream|logging]`` (its own process, as
triton_interop.py says why). ``stream``: tritonclient.grpc's start_stream /
async_stream_infer / stop_stream and tritonclient.grpc.aio's stream_infer, 20 add_one
requests and one for an unknown model each. ``logging``: get_log_settings,
update_log_settings (accepted and refused), get_trace_settings.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

COUNT = 20


def _inputs(value: float, module=triton) -> list:
    tensor = module.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))
    return [tensor]


def _collect(answers: list[tuple[object, object]]) -> dict:
    values, errors = {}, []
    for result, error in answers:
        if error is not None:
            errors.append(str(error))
        else:
            values[result.get_response().id] = result.as_numpy("y")[0].tolist()
    return {"values": values, "errors": errors}


def stream_sync(url: str) -> tuple[dict, bool]:
    answers: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(COUNT):
        client.async_stream_infer("add_one", _inputs(float(i)),
                                  request_id=f"sync-{i}",
                                  enable_empty_final_response=(i == 0))
    client.async_stream_infer("no_such_model", _inputs(0.0), request_id="sync-missing")
    client.stop_stream()  # waits for every answer
    client.close()
    collected = [answers.get_nowait() for _ in range(answers.qsize())]
    final = next(result.get_response().parameters["triton_final_response"].bool_param
                 for result, error in collected
                 if error is None and result.get_response().id == "sync-0")
    return _collect(collected), final


async def stream_asyncio(url: str) -> dict:
    async with triton_aio.InferenceServerClient(url) as client:
        async def requests():
            for i in range(COUNT):
                yield {"model_name": "add_one",
                       "inputs": _inputs(float(i), triton_aio), "request_id": f"asyncio-{i}"}
            yield {"model_name": "no_such_model", "inputs": _inputs(0.0, triton_aio)}

        answers = [pair async for pair in client.stream_infer(requests())]
    return _collect(answers)


def logging_settings(url: str) -> dict:
    client = triton.InferenceServerClient(url)
    out: dict = {"initial": client.get_log_settings(as_json=True)["settings"]}
    out["verbose"] = client.update_log_settings(
        {"log_verbose_level": 1, "log_format": "json"}, as_json=True)["settings"]
    out["read_back"] = client.get_log_settings(as_json=True)["settings"]
    refused = {}
    for label, settings in {"log_file": {"log_file": "/tmp/x.log"},
                            "contradiction": {"log_info": True, "log_warning": False},
                            "format": {"log_format": "ISO8601"}}.items():
        try:
            client.update_log_settings(settings)
            refused[label] = None
        except InferenceServerException as exc:
            refused[label] = [exc.status(), exc.message()]
    out["refused"] = refused
    out["after_refusals"] = client.get_log_settings(as_json=True)["settings"]
    out["restored"] = client.update_log_settings(
        {"log_verbose_level": 0, "log_info": True, "log_format": "text"},
        as_json=True)["settings"]
    try:
        out["trace"] = client.get_trace_settings(as_json=True)["settings"]
    except InferenceServerException as exc:
        out["trace"] = [exc.status(), exc.message()]
    client.close()
    return out


def main(url: str, mode: str) -> None:
    if mode == "stream":
        sync, final = stream_sync(url)
        print(json.dumps({"sync": sync, "sync_final_flag": final,
                          "asyncio": asyncio.run(stream_asyncio(url))}))
    else:
        print(json.dumps(logging_settings(url)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "stream")
