"""A cheap KServe V2 load generator: closed-loop concurrency or open-loop Poisson arrivals.

The request is built and serialised once; each call sends those bytes through a raw
grpc.aio unary method and reads the answer's status only, so the client spends its CPU
on the transport, not on protobuf. Measurement follows perf_analyzer: after a warm-up,
fixed windows are measured until the last three agree within 10% on throughput (or the
window budget runs out), and the stable windows are reported.
"""

from __future__ import annotations

import asyncio
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos.codec import encode_raw
from onnxserve.protos.datatypes import by_numpy
from onnxserve.protos.limits import MAX_MESSAGE_BYTES

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def build_request(model: str, inputs: dict[str, np.ndarray]) -> bytes:
    """A serialised ModelInferRequest with raw input contents."""
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        datatype = by_numpy(array.dtype)
        request.inputs.add(name=name, datatype=datatype.name, shape=array.shape)
        request.raw_input_contents.append(encode_raw(array, datatype))
    return request.SerializeToString()


@dataclass
class Window:
    seconds: float
    completed: int
    errors: int
    latencies_ms: list[float] = field(repr=False)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


@dataclass
class LoadResult:
    """One load's figures, whichever load generator measured them (perf_analyzer's
    PerfAnalyzerResult adds its own after these), so that their rows sit side by side."""

    mode: str
    concurrency: int
    rate: float | None
    samples_per_request: int
    windows: int
    stable: bool
    seconds: float
    #: requests completed in the measured windows (None: the load generator reported none)
    requests: int | None
    errors: int
    #: inferences (samples) per second
    throughput: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_percent: float

    def as_dict(self) -> dict:
        return asdict(self)


class _Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.completed = 0

    def take(self) -> tuple[list[float], int, int]:
        out = (self.latencies, self.completed, self.errors)
        self.latencies, self.completed, self.errors = [], 0, 0
        return out


async def _call(method, payload: bytes, recorder: _Recorder, timeout: float) -> None:
    start = time.perf_counter()
    try:
        await method(payload, timeout=timeout)
    except grpc.aio.AioRpcError:
        recorder.errors += 1
        return
    recorder.latencies.append((time.perf_counter() - start) * 1e3)
    recorder.completed += 1


async def _closed_loop(methods, payload, recorder, concurrency, stop, timeout):
    async def worker(method):
        while not stop.is_set():
            await _call(method, payload, recorder, timeout)

    await asyncio.gather(*(worker(methods[i % len(methods)]) for i in range(concurrency)))


async def _open_loop(methods, payload, recorder, rate, stop, timeout, max_in_flight=1024):
    rng = random.Random(0)
    in_flight: set[asyncio.Task] = set()
    next_at = time.perf_counter()
    while not stop.is_set():
        next_at += rng.expovariate(rate)
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            recorder.errors += 1  # the server is not keeping up: count as a drop
            continue
        method = methods[len(in_flight) % len(methods)]
        task = asyncio.ensure_future(_call(method, payload, recorder, timeout))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)


async def run_load(
    url: str,
    payload: bytes,
    *,
    samples_per_request: int = 1,
    concurrency: int = 1,
    rate: float | None = None,
    warmup_s: float = 2.0,
    window_s: float = 3.0,
    max_windows: int = 6,
    stability: float = 0.10,
    timeout_s: float = 30.0,
    connections: int = 0,
) -> LoadResult:
    """Drive ``url`` with ``payload``: closed loop at ``concurrency``, or Poisson at ``rate``/s.

    ``connections`` (default: min(concurrency, 4)) separate HTTP/2 connections share the
    load, so that several server processes behind one port all receive work.
    """
    connections = connections or max(1, min(concurrency, 4))
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    channels = [grpc.aio.insecure_channel(url, options=options) for _ in range(connections)]
    try:
        methods = [c.unary_unary(INFER_METHOD) for c in channels]  # bytes in, bytes out
        recorder = _Recorder()
        stop = asyncio.Event()
        if rate is None:
            driver = _closed_loop(methods, payload, recorder, concurrency, stop, timeout_s)
        else:
            driver = _open_loop(methods, payload, recorder, rate, stop, timeout_s)
        task = asyncio.ensure_future(driver)
        await asyncio.sleep(warmup_s)
        recorder.take()
        windows: list[Window] = []
        cpu_start = _cpu_seconds()
        started = time.perf_counter()
        stable = False
        while len(windows) < max_windows:
            t0 = time.perf_counter()
            await asyncio.sleep(window_s)
            latencies, completed, errors = recorder.take()
            windows.append(Window(time.perf_counter() - t0, completed, errors, latencies))
            if len(windows) >= 3:
                last = [w.throughput for w in windows[-3:]]
                if max(last) > 0 and (max(last) - min(last)) / max(last) <= stability:
                    stable = True
                    break
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_start
        stop.set()
        await task
    finally:
        for channel in channels:
            await channel.close()
    used = windows[-3:] if stable else windows
    latencies = np.array([x for w in used for x in w.latencies_ms]) if used else np.array([])
    seconds = sum(w.seconds for w in used)
    completed = sum(w.completed for w in used)

    def pct(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies.size else math.nan

    return LoadResult(
        mode="closed" if rate is None else "poisson", concurrency=concurrency, rate=rate,
        samples_per_request=samples_per_request, windows=len(windows), stable=stable,
        seconds=round(seconds, 2), requests=completed, errors=sum(w.errors for w in used),
        throughput=completed * samples_per_request / seconds if seconds else 0.0,
        p50_ms=pct(50), p90_ms=pct(90), p95_ms=pct(95), p99_ms=pct(99),
        client_cpu_percent=100 * cpu / elapsed if elapsed else 0.0,
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
