"""Which asyncio HTTP server library the HTTP/REST front end runs on: a measurement.

    python -m onnxserve.benchmarks.http_library [--seconds 3] [--repeats 3]
        [--out benchmarks/results/http_library.md]

(needs ``pip install uvicorn httptools`` besides onnxserve's own aiohttp; about two minutes)

Each candidate serves two handlers in a process of its own, on the standard asyncio event
loop (the one grpc.aio shares in onnxserve):

- ``noop``: a POST whose body is read and answered with a fixed 2-byte JSON body;
- ``infer``: a LeNet-5-sized inference in the binary tensor extension's shape: a JSON
  header (its length in ``Inference-Header-Content-Length``) and one 1x28x28x1 FP32 tensor
  (3,136 bytes) in, the header parsed, the tensor viewed with numpy, a 784x10 product
  computed and the 10 scores answered as JSON.

A raw-socket client (its own process, one asyncio loop, pre-built requests, keep-alive)
keeps ``c`` requests in flight, one per connection (closed loop), for ``--seconds`` each at
c=1 and c=16, after a warm-up. Each row is measured ``--repeats`` times, the candidates
taking turns (so that a burst of other work on the machine does not land on one candidate
only); the table gives the run with the median requests per second, and its median and
99th percentile latency. The client is far cheaper than any server, but both share the
machine's cores: compare the candidates with each other, within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import time
from pathlib import Path

import numpy as np

from onnxserve.export.cpu import this_cpu

CANDIDATES = ("aiohttp", "uvicorn-httptools", "uvicorn-h11")
HEADER = json.dumps({"inputs": [{"name": "input", "shape": [1, 28, 28, 1],
                                 "datatype": "FP32",
                                 "parameters": {"binary_data_size": 3136}}]}).encode()
TENSOR = np.random.default_rng(0).random((1, 28, 28, 1), dtype=np.float32).tobytes()
WEIGHTS = np.random.default_rng(1).random((784, 10), dtype=np.float32)


def _infer_answer(body: bytes, header_length: int) -> bytes:
    header = json.loads(body[:header_length])
    shape = header["inputs"][0]["shape"]
    tensor = np.frombuffer(body, dtype="<f4", offset=header_length).reshape(shape)
    scores = tensor.reshape(1, -1) @ WEIGHTS
    return json.dumps({"model_name": "lenet5", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 10],
         "data": scores.ravel().tolist()}]}).encode()


def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def noop(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"{}", content_type="application/json")

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        length = int(request.headers["Inference-Header-Content-Length"])
        return web.Response(body=_infer_answer(body, length), content_type="application/json")

    app = web.Application()
    app.router.add_post("/noop", noop)
    app.router.add_post("/infer", infer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _serve_uvicorn(port: int, http: str) -> None:
    import uvicorn

    json_headers = [(b"content-type", b"application/json")]

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if scope["path"] == "/infer":
            length = int(next(v for k, v in scope["headers"]
                              if k == b"inference-header-content-length"))
            answer = _infer_answer(body, length)
        else:
            answer = b"{}"
        await send({"type": "http.response.start", "status": 200, "headers": [
            *json_headers, (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(app, host="127.0.0.1", port=port, http=http, loop="asyncio",
                lifespan="off", access_log=False, log_level="warning")


def serve(candidate: str, port: int) -> None:
    """Run ``candidate``'s server on 127.0.0.1:``port`` until SIGTERM."""
    if candidate == "aiohttp":
        _serve_aiohttp(port)
    else:
        _serve_uvicorn(port, candidate.split("-", 1)[1])


def _request(path: str, port: int) -> bytes:
    if path == "/infer":
        body = HEADER + TENSOR
        extra = f"Inference-Header-Content-Length: {len(HEADER)}\r\n"
    else:
        body, extra = b'{"x": 1}', ""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:80]!r}")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
            return
    raise RuntimeError("an answer without Content-Length")


async def _load(port: int, path: str, concurrency: int, seconds: float) -> dict[str, float]:
    request = _request(path, port)
    latencies: list[float] = []
    warm_until = time.perf_counter() + min(1.0, seconds / 4)
    end = warm_until + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                started = time.perf_counter()
                if started >= end:
                    return
                writer.write(request)
                await _read_response(reader)
                if started >= warm_until:
                    latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    latencies.sort()
    return {"rps": len(latencies) / seconds,
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(seconds: float, repeats: int) -> list[dict[str, object]]:
    context = multiprocessing.get_context("spawn")
    servers = {}
    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    try:
        for candidate in CANDIDATES:
            port = _free_port()
            process = context.Process(target=serve, args=(candidate, port), daemon=True)
            process.start()
            servers[candidate] = (port, process)
            _wait_for_port(port)
        for _ in range(repeats):
            for path in ("/noop", "/infer"):
                for concurrency in (1, 16):
                    for candidate, (port, _process) in servers.items():
                        figures = asyncio.run(_load(port, path, concurrency, seconds))
                        runs.setdefault((candidate, path[1:], concurrency), []).append(
                            figures)
                        print(f"{candidate:18} {path[1:]:6} c={concurrency:<3} "
                              f"{figures['rps']:8.0f} req/s  p50 {figures['p50_ms']:.3f} "
                              f"ms  p99 {figures['p99_ms']:.3f} ms", flush=True)
    finally:
        for _port, process in servers.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
            process.join(10)
    rows: list[dict[str, object]] = []
    for candidate in CANDIDATES:
        for path in ("noop", "infer"):
            for concurrency in (1, 16):
                measured = sorted(runs[(candidate, path, concurrency)],
                                  key=lambda f: f["rps"])
                rows.append({"library": candidate, "handler": path,
                             "concurrency": concurrency, **measured[len(measured) // 2],
                             "all_rps": [round(f["rps"]) for f in measured]})
    return rows


def report(rows: list[dict[str, object]], seconds: float, repeats: int) -> str:
    from importlib.metadata import version

    versions = ", ".join(f"{p} {version(p)}" for p in ("aiohttp", "uvicorn", "httptools", "h11"))
    lines = [f"CPU: {this_cpu()} (server and client share them); "
             f"Python {platform.python_version()}; {versions}; {seconds:g} s per run, "
             f"{repeats} runs per row (median shown, all runs' req/s in the last column).",
             "", "| library | handler | c | req/s | p50 ms | p99 ms | runs, req/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['library']} | {r['handler']} | {r['concurrency']} | "
                     f"{r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{', '.join(map(str, r['all_rps']))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the table (markdown) here too")
    args = parser.parse_args()
    rows = measure(args.seconds, args.repeats)
    text = report(rows, args.seconds, args.repeats)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
