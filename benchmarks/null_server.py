"""A KServe V2 server that does nothing but answer: the transport's ceiling.

    python -m onnxserve.benchmarks.null_server --port P --output-shape 10

ModelInfer returns one prebuilt response (an FP32 output of the given shape) without
decoding the request, through the same grpc.aio stack and message limits as onnxserve.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import numpy as np

from onnxserve.protos import inference_pb2 as pb

_SERVICE = "inference.GRPCInferenceService"


def canned_response(output_shape: list[int]) -> bytes:
    response = pb.ModelInferResponse(model_name="null", model_version="1")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, *output_shape])
    response.raw_output_contents.append(np.zeros(output_shape, np.float32).tobytes())
    return response.SerializeToString()


async def serve(port: int, output_shape: list[int]) -> None:
    answer = canned_response(output_shape)

    async def infer(request: bytes, context) -> bytes:
        return answer

    async def ready(request: bytes, context) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    handler = grpc.method_handlers_generic_handler(_SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerReady": grpc.unary_unary_rpc_method_handler(ready),
    })
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                      ("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--output-shape", type=int, nargs="+", default=[10])
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.output_shape))


if __name__ == "__main__":
    main()
