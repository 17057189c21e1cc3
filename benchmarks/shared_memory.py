"""System shared memory against raw bytes: one model, one batch size, one client (c=1).

    python -m onnxserve.benchmarks.shared_memory --model-repository DIR --model mobilenet_v2

Starts ``onnxserve serve`` (gRPC only) on the repository and measures, with one closed-loop
gRPC client on this machine sending pre-built requests, the served inferences/s of

- ``raw``: the batch in raw_input_contents, outputs as raw bytes;
- ``shm in``: the batch in a registered system shared memory region (written once), outputs
  as raw bytes;
- ``shm in+out``: inputs and outputs in shared memory;

and raw onnxruntime in-process on the same file and batch (``session.run`` on the numpy
batch, all cores), in --rounds rounds of one --seconds window each (the four alternate, so
that load from elsewhere hits each alike). Each served figure is judged by its ratio to
raw onnxruntime in the same round, the median over the rounds; prints a Markdown table,
and writes it to --out when given.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from multiprocessing import shared_memory as mpshm
from pathlib import Path

import grpc
import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.protos.datatypes import by_config_type
from onnxserve.protos.limits import MAX_MESSAGE_BYTES
from onnxserve.serving.models.repository import read_model
from onnxserve.serving.process import ServerProcess

MODES = ("raw", "shm in", "shm in+out")
REFERENCE = "raw onnxruntime (in-process)"


def _requests(model: str, name: str, datatype: str, batch: np.ndarray, output: str,
              output_bytes: int) -> dict[str, pb.ModelInferRequest]:
    """The three modes' requests (regions "bench_in" and "bench_out")."""
    requests = {}
    for mode in MODES:
        request = pb.ModelInferRequest(model_name=model)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=batch.shape)
        if mode == "raw":
            request.raw_input_contents.append(batch.tobytes())
        else:
            tensor.parameters["shared_memory_region"].string_param = "bench_in"
            tensor.parameters["shared_memory_byte_size"].int64_param = batch.nbytes
        requested = request.outputs.add(name=output)
        if mode == "shm in+out":
            requested.parameters["shared_memory_region"].string_param = "bench_out"
            requested.parameters["shared_memory_byte_size"].int64_param = output_bytes
        requests[mode] = request
    return requests


def _throughput(call: Callable[[], object], seconds: float, batch: int) -> float:
    """Inferences/s of back-to-back ``call``s for ``seconds``."""
    calls = 0
    started = time.perf_counter()
    end = started + seconds
    while time.perf_counter() < end:
        call()
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="per window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    args = parser.parse_args(argv)

    source = read_model(args.model_repository, args.model)
    config = source.config
    spec, output = config.input[0], config.output[0].name
    datatype = by_config_type(spec.data_type)
    rng = np.random.default_rng(0)
    sample = (rng.integers(0, 256, tuple(spec.dims)) if datatype.numpy.kind in "iu"
              else rng.standard_normal(tuple(spec.dims))).astype(datatype.numpy)
    batch = np.repeat(sample[np.newaxis], args.batch, axis=0)
    output_bytes = args.batch * int(np.prod(config.output[0].dims)) * by_config_type(
        config.output[0].data_type).itemsize

    tag = os.getpid()
    regions = {"bench_in": mpshm.SharedMemory(f"onnxserve_bench_in_{tag}", create=True,
                                              size=batch.nbytes),
               "bench_out": mpshm.SharedMemory(f"onnxserve_bench_out_{tag}", create=True,
                                               size=output_bytes)}
    regions["bench_in"].buf[:batch.nbytes] = batch.tobytes()
    server = ServerProcess.serve(args.model_repository, "--http-port", "0",
                                 "--model-control-mode", "explicit", "--load-model",
                                 args.model)
    import onnxruntime as ort

    source_file = source.versions[max(source.versions)]
    session = ort.InferenceSession(str(source_file), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: batch}
    measured: dict[str, list[float]] = {mode: [] for mode in (REFERENCE, *MODES)}
    try:
        server.wait_ready(300)
        with grpc.insecure_channel(server.url, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            for name, block in regions.items():
                stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                    name=name, key="/" + block.name.lstrip("/"), byte_size=block.size))
            requests = _requests(args.model, spec.name, datatype.name, batch, output,
                                 output_bytes)
            calls: dict[str, Callable[[], object]] = {
                REFERENCE: lambda: session.run(None, feeds),
                **{mode: functools.partial(stub.ModelInfer, requests[mode], timeout=60)
                   for mode in MODES}}
            for call in calls.values():  # warm-up
                call()
            for _ in range(args.rounds):
                for mode, call in calls.items():
                    measured[mode].append(_throughput(call, args.seconds, args.batch))
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
    finally:
        server.stop()
        for block in regions.values():
            block.close()
            block.unlink()
    reference = measured[REFERENCE]
    lines = [f"{args.model}, batch {args.batch}, c=1, {os.cpu_count()} cores; median of "
             f"{args.rounds} rounds of {args.seconds:g} s windows",
             "", "| path | inferences/s | windows (min-max) | / raw onnxruntime, same round |",
             "|---|---|---|---|"]
    for mode, values in measured.items():
        ratio = statistics.median(v / r for v, r in zip(values, reference, strict=True))
        label = mode if mode == REFERENCE else f"served, {mode}"
        lines.append(f"| {label} | {statistics.median(values):.1f} | {min(values):.1f}-"
                     f"{max(values):.1f} | {ratio:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
