"""The native gRPC transport (serving/frontends/native/): built where gRPC C++ is installed,
chosen by --grpc-transport, and carrying every kind of call as grpc.aio does.

The NativeServer tests serve a small echo service over the native transport on an event
loop in a thread and call it with grpcio's client; the served tests of the rest of the
suite run the product's RPCs over whichever transport ``--grpc-transport`` (default
``auto``) picks, and ``make test`` runs the gRPC ones again over the python transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from onnxserve.serving import server as server_module
from onnxserve.serving.contract import OTHERS_IN_PROGRESS
from onnxserve.serving.frontends import native
from onnxserve.serving.process import ServerProcess
from onnxserve.serving.server import StartupError, grpc_transport

pytestmark = pytest.mark.grpc
built = pytest.mark.skipif(native.transport is None, reason="the native transport is not built")

SERVICE = "test.Echo"
LIMITS = [("grpc.max_receive_message_length", 64 << 20),
          ("grpc.max_send_message_length", 64 << 20)]


def test_built_wherever_grpc_cpp_is_installed() -> None:
    """`make test` installs libgrpc++-dev before onnxserve: a native transport silently not
    built there would leave every native test skipped and the python transport serving."""
    if shutil.which("pkg-config") is None or subprocess.run(
            ["pkg-config", "--exists", "grpc++"], check=False).returncode != 0:
        pytest.skip("gRPC C++ is not installed here")
    assert native.transport is not None, native.BUILD_PROBLEM


def test_the_server_serves_over_the_transport_asked_for(server: ServerProcess) -> None:
    """`make test` runs the gRPC tests twice, the second time with
    ONNXSERVE_GRPC_TRANSPORT=python: the servers must then really use grpcio."""
    asked = os.environ.get("ONNXSERVE_GRPC_TRANSPORT", "auto")
    expected = "python" if asked == "python" or native.transport is None else "native"
    assert f"({expected} transport)" in server.output()


@built
def test_the_choice_of_transport(monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    assert grpc_transport("python") == "python"
    assert grpc_transport("native") == grpc_transport("auto") == "native"
    monkeypatch.setattr(native, "transport", None)
    monkeypatch.setattr(native, "BUILD_PROBLEM", "No module named '_transport'")
    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        assert grpc_transport("auto") == "python"
    assert [r.getMessage() for r in caplog.records if "libgrpc++-dev" in r.getMessage()]
    with pytest.raises(StartupError, match=r"--grpc-transport native: the native gRPC "
                                           r"transport is not built .*libgrpc\+\+-dev.*"
                                           r"--grpc-transport python"):
        grpc_transport("native")


# --- NativeServer over an echo service ------------------------------------------------------

class Echo:
    """Handlers of every shape; records what the server side saw."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.metadata: dict[str, object] = {}
        self.written = 0

    async def unary(self, request: bytes, context) -> bytes:
        self.metadata = dict(context.invocation_metadata())
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to abort",
                                (("request-id", "r1"),))
        if request == b"raise":
            raise RuntimeError("a bug")
        if request == b"wait":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.append("unary")
                raise
        if request == b"remaining":
            return repr(context.time_remaining()).encode()
        if request == b"others":
            return repr(OTHERS_IN_PROGRESS.get()).encode()
        if request.startswith(b"sleep"):
            await asyncio.sleep(float(request[5:]))
        return request

    async def server_stream(self, request: bytes, context) -> None:
        count = int(request)
        for index in range(count):
            await context.write(b"x" * 65536 + str(index).encode())
            self.written = index + 1

    async def client_stream(self, requests: AsyncIterator[bytes], context) -> bytes:
        return b"|".join([request async for request in requests])

    async def bidi(self, requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        try:
            async for request in requests:
                yield request.upper()
        except asyncio.CancelledError:
            self.cancelled.append("bidi")
            raise


def _handlers(echo: Echo) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(echo.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi),
    })


class Served:
    def __init__(self, server, loop: asyncio.AbstractEventLoop, port: int, echo: Echo) -> None:
        self.server, self.loop, self.port, self.echo = server, loop, port, echo
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=LIMITS)

    def call(self, method: str, kind: str = "unary_unary"):
        return getattr(self.channel, kind)(f"/{SERVICE}/{method}")

    def open_calls(self) -> int:
        return self.server.transport.calls()


@pytest.fixture
def served() -> Iterator[Served]:
    if native.transport is None:
        pytest.skip("the native transport is not built")
    from onnxserve.serving.frontends.native.server import NativeServer

    echo = Echo()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = NativeServer(options=[("grpc.so_reuseport", 0), *LIMITS])
    server.add_generic_rpc_handlers((_handlers(echo),))
    port = server.add_port("127.0.0.1:0")
    assert port > 0
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    result = Served(server, loop, port, echo)
    try:
        yield result
    finally:
        result.channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _settled(served: Served, expected: int = 0, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while served.open_calls() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return served.open_calls()


def test_unary_calls_and_their_metadata(served: Served) -> None:
    unary = served.call("Unary")
    assert unary(b"hello", metadata=(("x-user", "ann"), ("x-trace-bin", b"\x00\x01"))) == \
        b"hello"
    assert served.echo.metadata["x-user"] == "ann"
    assert served.echo.metadata["x-trace-bin"] == b"\x00\x01"
    assert unary(b"") == b""
    big = bytes(range(256)) * 40000  # 10 MB, several HTTP/2 frames each way
    assert unary(big) == big
    assert _settled(served) == 0


def test_failures_carry_their_status_message_and_trailers(served: Served) -> None:
    unary = served.call("Unary")
    with pytest.raises(grpc.RpcError) as aborted:
        unary(b"abort")
    assert aborted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert aborted.value.details() == "asked to abort"
    assert ("request-id", "r1") in tuple(aborted.value.trailing_metadata())
    with pytest.raises(grpc.RpcError) as failed:
        unary(b"raise")
    assert failed.value.code() == grpc.StatusCode.UNKNOWN
    assert "RuntimeError: a bug" in failed.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        served.channel.unary_unary("/test.Echo/Nope")(b"")
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_streams_of_every_shape(served: Served) -> None:
    replies = list(served.call("ServerStream", "unary_stream")(b"20"))
    assert [r[65536:] for r in replies] == [str(i).encode() for i in range(20)]
    assert served.call("ClientStream", "stream_unary")(iter([b"a", b"b", b"c"])) == b"a|b|c"
    assert served.call("ClientStream", "stream_unary")(iter([])) == b""
    assert list(served.call("Bidi", "stream_stream")(iter([b"x", b"y"]))) == [b"X", b"Y"]
    assert _settled(served) == 0


def test_a_client_that_does_not_read_holds_the_writer_back(served: Served) -> None:
    """The handler's writes wait once the client stops reading (HTTP/2 flow control and
    WRITE_WINDOW), instead of piling the answers up in the server."""
    replies = served.call("ServerStream", "unary_stream")(b"2000")  # 131 MB if unread
    first = next(replies)
    assert first.endswith(b"0")
    time.sleep(1.0)
    held = served.echo.written
    # HTTP/2 windows (grown by gRPC's bandwidth probing) and the client's buffers hold up
    # to some tens of MB; unbounded, the handler writes all 2000 (131 MB) within the second
    assert held < 1000, f"the handler wrote {held} messages of 64 KiB to a client not reading"
    rest = sum(1 for _ in replies)
    assert rest == 1999 and served.echo.written == 2000


def test_a_cancelled_call_cancels_its_handler(served: Served) -> None:
    future = served.call("Unary").future(b"wait")
    time.sleep(0.3)
    assert future.cancel()
    deadline = time.monotonic() + 5
    while "unary" not in served.echo.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.echo.cancelled == ["unary"]
    assert _settled(served) == 0

    stream = served.call("Bidi", "stream_stream")(iter([b"a"] + [b"b"] * 0), timeout=None)
    assert next(stream) == b"A"
    assert _settled(served) == 0


def test_a_deadline_ends_the_call_and_its_handler(served: Served) -> None:
    unary = served.call("Unary")
    remaining = float(unary(b"remaining", timeout=5.0))
    assert 4.0 < remaining <= 5.01  # gRPC sends the timeout rounded up to its unit
    assert unary(b"remaining") == b"None"
    with pytest.raises(grpc.RpcError) as late:
        unary(b"wait", timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while "unary" not in served.echo.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.echo.cancelled == ["unary"]
    assert _settled(served) == 0


def test_a_call_knows_whether_others_are_in_progress(served: Served) -> None:
    """The hint the data plane batches by (OTHERS_IN_PROGRESS): a call taken while
    another is unanswered knows of it; one taken alone does not."""
    unary = served.call("Unary")
    assert unary(b"others", timeout=10) == b"False"
    held = unary.future(b"sleep0.5", timeout=10)
    try:
        time.sleep(0.1)
        assert unary(b"others", timeout=10) == b"True"
    finally:
        assert held.result() == b"sleep0.5"
    assert _settled(served) == 0
    assert unary(b"others", timeout=10) == b"False"


def test_many_calls_at_once_get_their_own_answers(served: Served) -> None:
    unary = served.call("Unary")

    def client(index: int) -> int:
        wrong = 0
        for k in range(40):
            payload = f"{index}:{k}".encode() * (1 + k % 7)
            wrong += unary(payload, timeout=30) != payload
        return wrong

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(client, range(16))) == 0
    assert _settled(served) == 0


def test_stop_lets_calls_in_progress_finish_and_refuses_new_ones(served: Served) -> None:
    slow = served.call("Unary").future(b"sleep0.5")
    time.sleep(0.2)
    stopping = asyncio.run_coroutine_threadsafe(served.server.stop(5.0), served.loop)
    assert slow.result(10) == b"sleep0.5"
    stopping.result(10)
    with pytest.raises(grpc.RpcError) as refused:
        served.call("Unary")(b"late", timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_fork_after_the_transport_started_is_reported_and_its_child_refuses_it(
        tmp_path) -> None:
    """gRPC C++ cannot be used in a process forked after it started (its threads are not
    copied): the fork is logged, and the child refuses to build or start a transport."""
    if native.transport is None:
        pytest.skip("the native transport is not built")
    script = tmp_path / "fork.py"
    script.write_text(
        "import logging, os, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from onnxserve.serving.frontends.native.server import NativeServer\n"
        "before = os.fork()\n"  # before any transport started: the child may build one
        "if before == 0:\n"
        "    NativeServer(options=[('grpc.so_reuseport', 0)]); os._exit(0)\n"
        "assert os.waitpid(before, 0)[1] == 0\n"
        "server = NativeServer(options=[('grpc.so_reuseport', 0)])\n"
        "assert server.add_port('127.0.0.1:0') > 0\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    try:\n"
        "        NativeServer()\n"
        "    except RuntimeError as exc:\n"
        "        print('child refused:', exc, flush=True); os._exit(0)\n"
        "    os._exit(3)\n"
        "assert os.waitpid(child, 0)[1] == 0\n"
        "server.transport.stop(0)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "child refused: this process is a fork of one whose native gRPC transport" \
        in done.stdout
    assert done.stderr.count("fork after the native gRPC transport started") == 1
