"""A KServe V2 server that does nothing but answer: the transport's ceiling.

    python -m onnxserve.benchmarks.null_server --port P --model-config config.pbtxt [--parse]

ModelInfer returns one prebuilt response (the model's first output, zeros, for one sample)
without decoding the request, through the same grpc.aio stack and message limits as
onnxserve. ``--parse`` adds the least any server that reads its inputs does: each request
parsed into a ModelInferRequest, its raw inputs viewed as arrays, and a response message
built and serialised per request with one output row per sample; the gap between the two
is protobuf's share of a request.

It also answers ServerReady, ServerMetadata, ModelMetadata, ModelConfig and
ModelStatistics (with the count of inferences answered) for the model in --model-config,
so that Triton's perf_analyzer, which asks for them before and during a measurement, can
measure it too.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.datatypes import by_config_type
from onnxserve.protos.limits import MAX_MESSAGE_BYTES
from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.process import die_with_parent_if_asked

_SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "null"


def _batched(config: ModelConfig, dims) -> list[int]:
    return ([-1] if config.max_batch_size > 0 else []) + list(dims)


def _output(config: ModelConfig) -> tuple[str, str, np.ndarray]:
    """The first output's name, V2 datatype and one sample of zeros."""
    output = config.output[0]
    datatype = by_config_type(output.data_type)
    dims = [max(d, 1) for d in output.dims]
    return output.name, datatype.name, np.zeros(dims, datatype.numpy)


def canned_response(config: ModelConfig) -> bytes:
    """The serialised response for one sample."""
    name, datatype, sample = _output(config)
    response = pb.ModelInferResponse(model_name=config.name, model_version="1")
    shape = [1, *sample.shape] if config.max_batch_size > 0 else list(sample.shape)
    response.outputs.add(name=name, datatype=datatype, shape=shape)
    response.raw_output_contents.append(sample.tobytes())
    return response.SerializeToString()


def metadata(config: ModelConfig) -> pb.ModelMetadataResponse:
    response = pb.ModelMetadataResponse(name=config.name, versions=["1"],
                                        platform=config.platform)
    for tensors, target in ((config.input, response.inputs), (config.output, response.outputs)):
        for tensor in tensors:
            target.add(name=tensor.name, datatype=by_config_type(tensor.data_type).name,
                       shape=_batched(config, tensor.dims))
    return response


class NullModel:
    """The answers for one model; ``answered`` counts the inferences (samples) answered."""

    def __init__(self, config: ModelConfig, parse: bool) -> None:
        self.config = config
        self.answered = 0
        self.requests = 0
        self._canned = canned_response(config)
        self._parse = parse
        self._output_name, self._datatype, self._sample = _output(config)

    async def infer(self, request: bytes, context) -> bytes:
        self.requests += 1
        if not self._parse:
            self.answered += 1
            return self._canned
        message = pb.ModelInferRequest.FromString(request)
        rows = 1
        for tensor, raw in zip(message.inputs, message.raw_input_contents, strict=False):
            np.frombuffer(raw, np.uint8)
            if self.config.max_batch_size > 0 and tensor.shape:
                rows = tensor.shape[0]
        self.answered += rows
        batch = np.broadcast_to(self._sample, (rows, *self._sample.shape))
        response = pb.ModelInferResponse(model_name=message.model_name, model_version="1",
                                         id=message.id)
        response.outputs.add(name=self._output_name, datatype=self._datatype,
                             shape=batch.shape)
        response.raw_output_contents.append(batch.tobytes())
        return response.SerializeToString()

    def statistics(self) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        stats = response.model_stats.add(name=self.config.name, version="1",
                                         inference_count=self.answered,
                                         execution_count=self.requests)
        # Every duration counted (with no time spent): perf_analyzer reports the server's
        # side only when the statistics account for each request.
        for duration in ("success", "queue", "compute_input", "compute_infer",
                         "compute_output"):
            getattr(stats.inference_stats, duration).count = self.requests
        return response


def _unary(answer: Callable[[Any], Message], request_type: type[Message]) -> grpc.RpcMethodHandler:
    async def handle(request: bytes, context) -> bytes:
        return answer(request_type.FromString(request)).SerializeToString()

    return grpc.unary_unary_rpc_method_handler(handle)


def handlers(model: NullModel) -> dict[str, grpc.RpcMethodHandler]:
    config = model.config
    meta = metadata(config)
    infer: Callable[[bytes, object], Awaitable[bytes]] = model.infer
    return {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerReady": _unary(lambda _: pb.ServerReadyResponse(ready=True),
                              pb.ServerReadyRequest),
        "ServerLive": _unary(lambda _: pb.ServerLiveResponse(live=True), pb.ServerLiveRequest),
        "ModelReady": _unary(lambda _: pb.ModelReadyResponse(ready=True),
                             pb.ModelReadyRequest),
        "ServerMetadata": _unary(lambda _: pb.ServerMetadataResponse(
            name=SERVER_NAME, version="0", extensions=["model_configuration", "statistics"]),
                                 pb.ServerMetadataRequest),
        "ModelMetadata": _unary(lambda _: meta, pb.ModelMetadataRequest),
        "ModelConfig": _unary(lambda _: pb.ModelConfigResponse(config=config),
                              pb.ModelConfigRequest),
        "ModelStatistics": _unary(lambda _: model.statistics(), pb.ModelStatisticsRequest),
    }


async def serve(port: int, config: ModelConfig, parse: bool) -> None:
    model = NullModel(config, parse)
    # no SO_REUSEPORT (gRPC's default): on a port another server holds, fail instead of
    # silently sharing its connections and measuring both
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, handlers(model)),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def read_config(path: Path) -> ModelConfig:
    """A ModelConfig in protobuf text format (config.pbtxt); it needs an input and an output."""
    config = text_format.Parse(path.read_text(), ModelConfig())
    if not config.input or not config.output:
        raise SystemExit(f"{path}: the null server needs a config with an input and an output")
    return config


def main() -> None:
    die_with_parent_if_asked()  # started by bench (process.spawn)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-config", type=Path, required=True,
                        help="the model to pretend to serve (config.pbtxt text format, with "
                             "its inputs and outputs)")
    parser.add_argument("--parse", action="store_true",
                        help="parse each request and build each response (see the module "
                             "docstring)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, read_config(args.model_config), args.parse))


if __name__ == "__main__":
    main()
