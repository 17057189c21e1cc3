"""A client that pings the server every second, busy and idle; prints what happened as JSON.

Run in its own process: ``python keepalive_client.py MODE HOST:PORT MODEL``, MODE one of

- ``aio``: a raw grpc.aio channel with grpc.keepalive_time_ms=1000,
  grpc.keepalive_permit_without_calls=1 and grpc.http2.max_pings_without_data=0: idle
  (pinging) for 4.5 s, then one held call;
- ``triton``: tritonclient with KeepAliveOptions(keepalive_time_ms=1000,
  http2_max_pings_without_data=0) (it pings only while a call is in flight): one held call
  as soon as it is connected;
- ``triton-idle``: the same with keepalive_permit_without_calls=True: idle 4.5 s, one held
  call.

MODEL must hold each request a few seconds (a dynamic batcher waiting for a batch that never
fills). Prints ``{"calls": [[status, seconds], ...], "states": [...]}``: each call's gRPC
status name and duration, and the channel's connectivity states after the first READY (a
GOAWAY shows as a move away from READY). tritonclient and onnxserve's protobuf modules
cannot be imported into one process, hence a script.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np

PING_MS = 1000
IDLE_S = 4.5


def _aio(url: str, model: str) -> dict:
    import grpc

    from onnxserve.protos import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    payload = request.SerializeToString()
    options = [("grpc.keepalive_time_ms", PING_MS), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    calls: list[list] = []
    states: list[str] = []

    async def main() -> None:
        async with grpc.aio.insecure_channel(url, options=options) as channel:
            await asyncio.wait_for(channel.channel_ready(), 20)

            async def watch() -> None:
                state = channel.get_state()
                while True:
                    await channel.wait_for_state_change(state)
                    state = channel.get_state()
                    states.append(state.name)

            watcher = asyncio.create_task(watch())
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for pause in (IDLE_S,):
                await asyncio.sleep(pause)
                started = time.monotonic()
                try:
                    await infer(payload, timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = f"{exc.code().name}: {exc.details()}"
                calls.append([code, round(time.monotonic() - started, 2)])
            watcher.cancel()

    asyncio.run(main())
    return {"calls": calls, "states": states}


def _triton(url: str, model: str, idle: bool) -> dict:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    keepalive = triton.KeepAliveOptions(keepalive_time_ms=PING_MS,
                                        keepalive_permit_without_calls=idle,
                                        http2_max_pings_without_data=0)
    client = triton.InferenceServerClient(url, keepalive_options=keepalive)
    states: list[str] = []
    seen_ready = []

    def on_state(state) -> None:  # connectivity changes, after the first READY
        if seen_ready:
            states.append(state.name)
        elif state.name == "READY":
            seen_ready.append(True)

    client._channel.subscribe(on_state, try_to_connect=True)
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    calls: list[list] = []
    for pause in ((IDLE_S,) if idle else (0.0,)):
        time.sleep(pause)
        started = time.monotonic()
        try:
            client.infer(model, [tensor], client_timeout=30)
            code = "OK"
        except InferenceServerException as exc:
            code = f"{exc.status()}: {exc.message()}"
        calls.append([code, round(time.monotonic() - started, 2)])
    client.close()
    return {"calls": calls, "states": states}


if __name__ == "__main__":
    mode, url, model = sys.argv[1:4]
    result = _aio(url, model) if mode == "aio" else _triton(url, model, mode == "triton-idle")
    print(json.dumps(result))
