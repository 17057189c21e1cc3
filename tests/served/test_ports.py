"""Ports (issue 21): a port another server listens on stops the start with one line naming
its flag, the same for gRPC, HTTP and metrics; only the workers of one ``--workers N``
share the gRPC and HTTP ports; a client that speaks another protocol to the HTTP port
(gRPC, TLS) is told so in one answer and one log line."""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.process import ServerProcess, free_port, onnxserve_command

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

#: gRPC core's own log line format ("E1206 06:20:39.792990 7023 add_port.cc:83] ...")
C_CORE_LINE = re.compile(r"^[EWIF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ports")
    build_test_models(folder)
    return folder


def _serve(repository: Path, *flags: str) -> tuple[int, str]:
    """`onnxserve serve` on 127.0.0.1 with ``flags``; it must exit by itself (a server
    that starts instead runs into the timeout, is killed and fails the test)."""
    try:
        result = subprocess.run(
            onnxserve_command("serve", "--model-repository", str(repository), "--grpc-host",
                              "127.0.0.1", "--metrics-port", "0", *flags),
            capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the server started instead of failing:\n{exc.stdout}\n"
                             f"{exc.stderr}") from None
    return result.returncode, result.stdout + result.stderr


def _assert_one_line(status: int, output: str, line: str) -> None:
    assert status == 2, output
    assert [x for x in output.splitlines() if "cannot listen" in x] == [line], output
    assert "Traceback" not in output and not C_CORE_LINE.search(output), output


@pytest.fixture(scope="module", params=[1, 2], ids=["single", "workers2"])
def running(request: pytest.FixtureRequest, repository: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server (alone, or as 2 workers) that holds its gRPC and HTTP ports."""
    log = tmp_path_factory.mktemp("first") / "server.log"
    server = start_server(repository, log, "--workers", str(request.param))
    if request.param == 2:  # both workers listening, not only the first
        server.wait_started(60, lambda: server.output().count("models loaded") == 2)
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("clash", ["grpc", "http", "workers2"])
def test_a_second_server_on_a_running_servers_ports_does_not_start(
        running: ServerProcess, repository: Path, clash: str) -> None:
    """Both used to start (SO_REUSEPORT on both sockets, even with one worker) and share
    the connections; now the second fails with the line a taken port gets, alone or as
    a --workers supervisor (which checks before starting any worker)."""
    assert running.http_url is not None
    grpc_port, http_port = running.url.split(":")[1], running.http_url.split(":")[1]
    grpc_line = (f"onnxserve serve: cannot listen for gRPC on 127.0.0.1:{grpc_port}: Address "
                 "already in use (choose another port with --grpc-port)")
    if clash == "grpc":
        status, output = _serve(repository, "--grpc-port", grpc_port,
                                "--http-port", str(free_port()))
        _assert_one_line(status, output, grpc_line)
    elif clash == "http":
        status, output = _serve(repository, "--grpc-port", str(free_port()),
                                "--http-port", http_port)
        _assert_one_line(status, output, (
            f"onnxserve serve: cannot listen for HTTP on 127.0.0.1:{http_port}: Address "
            "already in use (choose another port with --http-port, 0 = off)"))
    else:
        status, output = _serve(repository, "--grpc-port", grpc_port, "--http-port",
                                http_port, "--workers", "2")
        _assert_one_line(status, output, grpc_line)
        assert "worker 0 started" not in output, output
    # the running server still answers every connection, as it did
    for _ in range(10):
        connection = http.client.HTTPConnection("127.0.0.1", int(http_port), timeout=10)
        connection.request("GET", "/v2/health/ready")
        assert connection.getresponse().status == 200
        connection.close()


@pytest.mark.parametrize("name, workers", [
    ("grpc", 1), ("http", 1), ("metrics", 1), ("grpc", 2), ("http", 2)])
def test_a_port_in_use_stops_the_start_with_one_line(repository: Path, name: str,
                                                     workers: int) -> None:
    """The gRPC port used to end in a traceback, a gRPC core ``E...`` line and status 1;
    every port now gets the same line naming its flag, status 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"grpc": free_port(), "http": free_port(), "metrics": 0, name: port}
        status, output = _serve(repository, "--grpc-port", str(ports["grpc"]), "--http-port",
                                str(ports["http"]), "--metrics-port", str(ports["metrics"]),
                                "--workers", str(workers))
    what, off = {"grpc": ("gRPC", ""), "http": ("HTTP", ", 0 = off"),
                 "metrics": ("metrics", ", 0 = off")}[name]
    _assert_one_line(status, output, (
        f"onnxserve serve: cannot listen for {what} on 127.0.0.1:{port}: Address already in "
        f"use (choose another port with --{name}-port{off})"))


def test_an_address_not_of_this_machine_stops_the_start_with_one_line(
        repository: Path) -> None:
    port = free_port()
    result = subprocess.run(
        onnxserve_command("serve", "--model-repository", str(repository), "--grpc-host",
                          "192.0.2.1", "--grpc-port", str(port), "--metrics-port", "0"),
        capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    _assert_one_line(result.returncode, output, (
        f"onnxserve serve: cannot listen for gRPC on 192.0.2.1:{port}: Cannot assign "
        "requested address (check --grpc-host, or choose another port with --grpc-port)"))


# --- another protocol on the HTTP port ---------------------------------------------------


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("protocols") / "server.log"
    server = start_server(repository, log)
    yield server
    assert server.stop() == 0


def _get(host_port: str, path: str = "/v2/health/live") -> int:
    host, port = host_port.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_grpc_client_on_the_http_port_is_told_the_grpc_port(server: ServerProcess) -> None:
    """It used to get "Failed parsing HTTP/2" while the server logged aiohttp's traceback at
    ERROR; now the call fails UNIMPLEMENTED naming the gRPC port, and one line is logged."""
    assert server.http_url is not None
    http_port = server.http_url.split(":")[1]
    grpc_port = server.url.split(":")[1]
    before = server.output()
    with grpc.insecure_channel(server.http_url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(2):  # the connection ends after the answer; the next one is answered too
            with pytest.raises(grpc.RpcError) as info:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert info.value.details() == (
                f"port {http_port} is onnxserve's HTTP/REST port (KServe V2 REST over "
                f"HTTP/1.1), not gRPC; gRPC is on port {grpc_port}")
    assert _get(server.http_url) == 200  # HTTP/1.1 is served as before
    with grpc.insecure_channel(server.url) as channel:  # and gRPC on its port
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    logged = server.output()[len(before):]
    lines = [line for line in logged.splitlines() if "connected to the HTTP/REST port" in line]
    assert len(lines) == 2 and all(" WARNING " in line and f"gRPC is on port {grpc_port}"
                                   in line for line in lines), logged
    assert "Traceback" not in logged and " ERROR " not in logged, logged


def test_a_tls_client_on_the_plaintext_http_port_gets_one_answer(
        server: ServerProcess) -> None:
    assert server.http_url is not None
    host, port = server.http_url.split(":")
    before = server.output()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises(ssl.SSLError, match="WRONG_VERSION_NUMBER"):
            context.wrap_socket(raw, server_hostname=host)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05hello")  # what the TLS client saw, in plain
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(f"port {port} serves plain HTTP, not TLS: use an http:// URL, or "
                           "start the server with --tls-cert and --tls-key\n".encode())
    logged = server.output()[len(before):]
    lines = [line for line in logged.splitlines() if "a TLS client" in line]
    assert len(lines) == 2 and all(" WARNING " in line for line in lines), logged
    assert "Traceback" not in logged and " ERROR " not in logged, logged


def test_http_on_the_grpc_port_is_refused_by_grpc_itself(server: ServerProcess) -> None:
    """Documented, not changed: gRPC's C core answers an HTTP/1.1 request with its HTTP/2
    SETTINGS frame and closes (curl: "Received HTTP/0.9 when not allowed"), as Triton's
    does; nothing is logged and gRPC goes on serving."""
    before = server.output()
    with pytest.raises((http.client.HTTPException, OSError)):
        _get(server.url)
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert server.output()[len(before):].strip() == ""


def test_the_first_bytes_are_judged_across_reads() -> None:
    """The HTTP/2 preface split over several reads is still recognised (and the frames that
    follow it parsed); an HTTP/1.1 request that starts like the preface ("P") is served."""
    from onnxserve.serving.frontends.http_server import HttpServer, bind
    from onnxserve.serving.frontends.http_service import HttpService
    from onnxserve.serving.frontends.wrong_protocol import HTTP2_PREFACE

    class Plane:
        accepting = True

        def live(self) -> bool:
            return True

    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
                + stream.to_bytes(4, "big") + payload)

    async def scenario() -> None:
        server = HttpServer(HttpService(Plane(), 4 << 20), bind("127.0.0.1", 0),  # type: ignore[arg-type]
                            grpc_port=8001)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            for part in (HTTP2_PREFACE[:3], HTTP2_PREFACE[3:10], HTTP2_PREFACE[10:]
                         + frame(0x4, 0, 0)):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(frame(0x1, 0x5, 1, b"\x82"))  # HEADERS, stream 1 (":method GET")
            got = await asyncio.wait_for(reader.read(), 10)  # to the server's end of stream
            frames = []
            while got:
                length = int.from_bytes(got[:3], "big")
                frames.append((got[3], got[4], int.from_bytes(got[5:9], "big"),
                               got[9:9 + length]))
                got = got[9 + length:]
            # SETTINGS, SETTINGS ACK, HEADERS (END_STREAM | END_HEADERS) on 1, GOAWAY
            assert [f[:3] for f in frames] == [(0x4, 0, 0), (0x4, 1, 0), (0x1, 0x5, 1),
                                               (0x7, 0, 0)]
            assert b"gRPC is on port 8001" in frames[2][3]  # grpc-message
            # last stream 1, NO_ERROR, the message as debug data
            assert frames[3][3].startswith((1).to_bytes(4, "big") + bytes(4))
            assert frames[3][3].endswith(b"gRPC is on port 8001")
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            for part in (b"P", b"OST /v2/health/live HTTP/1.1\r\nHost: x\r\n",
                         b"Content-Length: 0\r\n\r\n"):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.05)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 405 ")  # served by aiohttp: GET only
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            writer.close()
        finally:
            await server.stop()

    asyncio.run(scenario())
