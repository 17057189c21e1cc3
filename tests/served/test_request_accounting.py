"""What a client gets wrong is answered as the client's, and every inference request is
counted and logged once under the status the client saw: JSON numbers beyond their type's
range, bodies that cannot be read or decoded (content codings), malformed requests, answers
too large to send, and the Bearer scheme's case (issue 21, items 6, 7, 9, 11).

One server (a token, a 4 MiB message limit, metrics, JSON logs at DEBUG so that no
request_failed event is summarised away) serves every test here."""

from __future__ import annotations

import gzip
import json
import time
import urllib.request
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.http_calls import Answer, call
from support.onnx_models import add_one_model
from support.repositories import build_test_models
from support.served import start_server

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.protos.datatypes import by_name
from onnxserve.serving.frontends.auth import bearer_refusal
from onnxserve.serving.frontends.http_answers import HttpFrontEndError
from onnxserve.serving.frontends.http_body import decode_content
from onnxserve.serving.process import ServerProcess, free_port

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)

LIMIT = 4 * 1024 * 1024  # --max-message-bytes (its smallest)
TOKEN = "accounting-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: wide's rows: 3 rows in (2.4 MB) fit the limit, their two outputs (4.8 MB) do not
WIDE = 200_000
ADD_ONE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                       "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("accounting")
    build_test_models(repository)
    add_one_model(repository / "wide" / "1" / "model.onnx", size=WIDE)
    token_file = repository.parent / "accounting-token"
    token_file.write_text(TOKEN + "\n")
    metrics_port = free_port()
    started = start_server(repository, repository.parent / "accounting.log",
                           "--max-message-bytes", str(LIMIT), "--metrics-port",
                           str(metrics_port), "--auth-token-file", str(token_file),
                           "--log-format", "json", "--log-level", "DEBUG", token=TOKEN)
    started.metrics_port = metrics_port  # type: ignore[attr-defined]
    yield started
    started.stop()
    assert "Traceback" not in started.output()


def post(server: ServerProcess, path: str, body: bytes,
         headers: dict[str, str] | None = None) -> Answer:
    return call(server, "POST", path, body, {**AUTH, **(headers or {})})


def counts(server: ServerProcess, model: str) -> dict[tuple[str, str], float]:
    """onnxserve_requests_total of ``model`` by (protocol, status), every version summed."""
    port = server.metrics_port  # type: ignore[attr-defined]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "onnxserve_requests_total" and sample.labels["model"] == model:
                key = (sample.labels["protocol"], sample.labels["status"])
                out[key] = out.get(key, 0) + sample.value
    return out


def grown(before: dict, after: dict) -> dict[tuple[str, str], float]:
    return {key: after[key] - before.get(key, 0) for key in after
            if after[key] != before.get(key, 0)}


def failed_event(server: ServerProcess, request_id: str) -> dict:
    """The one request_failed event of ``request_id`` in the server's JSON log (waiting up
    to 10 s for it to be written)."""
    deadline = time.monotonic() + 10
    while True:
        events = [event for line in server.output().splitlines() if line.startswith("{")
                  for event in [json.loads(line)]
                  if event.get("event") == "request_failed"
                  and event.get("request_id") == request_id]
        if events or time.monotonic() > deadline:
            assert len(events) == 1, f"{len(events)} request_failed events for {request_id}"
            return events[0]
        time.sleep(0.1)


def _echo_request(bad_name: str, bad_text: str) -> bytes:
    """An echo request with every input (echo needs them all), input ``bad_name``'s data
    written as ``bad_text`` (JSON text, so that it can hold 1e400)."""
    entries = []
    for name in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                 "INT64", "FP16", "FP32", "FP64", "BYTES"):
        data = [["a", "b"]] if name == "BYTES" else [[True, False]] if name == "BOOL" \
            else [[1, 2]]
        entries.append({"name": f"in_{name}", "datatype": name, "shape": [1, 2],
                        "data": "BAD" if name == bad_name else data})
    return json.dumps({"inputs": entries}).replace('"BAD"', bad_text).encode()


# --- item 6: JSON numbers beyond their type's range ---------------------------------------

@pytest.mark.parametrize(("name", "data", "message"), [
    ("FP16", "[70000, 1]", "FP16 data must be numbers from -65504 to 65504"),
    ("FP16", "[1e6, -1e5]", "element 0 is 1000000.0, beyond FP16's range"),
    ("FP32", "[1e39, 1]", "FP32 data must be numbers from -3.4028235e+38 to 3.4028235e+38"),
    ("FP64", "[1, -1e400]", "element 1 is a number too large for a double"),
    ("FP32", f"[1, {10**400}]", "element 1 is 10000000000000000000...(401 digits)"),
    ("FP16", f"[1, {2**70}]", "element 1 is 1180591620717411303424, beyond FP16's range"),
])
def test_json_floats_beyond_their_type_are_refused_naming_the_range(
        server: ServerProcess, name: str, data: str, message: str) -> None:
    answer = post(server, "/v2/models/echo/infer", _echo_request(name, data))
    assert answer.status == 400, answer.body[:300]
    assert f"input 'in_{name}': " in answer.error and message in answer.error


def test_json_floats_in_range_and_spelt_infinities_are_served(server: ServerProcess) -> None:
    for name, data, expected in (
            ("FP16", "[65504, -65504]", [65504, -65504]),
            ("FP32", f"[{2**70}, 1]", [float(2**70), 1]),  # past int64, within FP32
            ("FP64", "[Infinity, -Infinity]", [np.inf, -np.inf])):
        answer = post(server, "/v2/models/echo/infer", _echo_request(name, data))
        assert answer.status == 200, answer.body[:300]
        (output,) = [o for o in json.loads(answer.body)["outputs"]
                     if o["name"] == f"out_{name}"]
        np.testing.assert_array_equal(np.array(output["data"], dtype=np.float64),
                                      np.array(expected, dtype=by_name(name).numpy))


# --- items 7 and 11: refused before the data plane: counted, logged, 4xx naming it --------

@pytest.mark.parametrize(("body", "headers", "status", "code", "message"), [
    (b'{"inputs": [', {}, 400, "INVALID_ARGUMENT", "is not valid JSON"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, 400, "INVALID_ARGUMENT",
     "is 99 but the body is only 14 bytes"),
    (b'{"id": "mine", "inputs": 3}', {}, 400, "INVALID_ARGUMENT",
     "inputs must be a non-empty JSON array"),
    (json.dumps(ADD_ONE).encode(), {"Content-Encoding": "gzip"}, 400, "INVALID_ARGUMENT",
     "the request body is not gzip data as its Content-Encoding says"),
    (gzip.compress(json.dumps(ADD_ONE).encode())[:-12], {"Content-Encoding": "gzip"}, 400,
     "INVALID_ARGUMENT", "gzip data is cut short"),
    (b"\x78\x9c" + json.dumps(ADD_ONE).encode(), {"Content-Encoding": "deflate"}, 400,
     "INVALID_ARGUMENT", "the request body is not deflate data as its Content-Encoding says"),
    (json.dumps(ADD_ONE).encode(), {"Content-Encoding": "br"}, 415, "INVALID_ARGUMENT",
     "Content-Encoding 'br' is not offered: send it as is, or with gzip or deflate"),
    (json.dumps(ADD_ONE).encode(), {"Content-Encoding": "zstd"}, 415, "INVALID_ARGUMENT",
     "Content-Encoding 'zstd' is not offered"),
    (gzip.compress(b" " * (LIMIT + 1)), {"Content-Encoding": "gzip"}, 413,
     "RESOURCE_EXHAUSTED", "over the limit of 4194304 bytes (--max-message-bytes) once gzip "
     "decoded"),
], ids=["json", "header-length", "not-a-request", "not-gzip", "gzip-cut-short",
        "not-deflate", "br", "zstd", "gzip-bomb"])
def test_refused_http_requests_are_counted_and_logged(
        server: ServerProcess, body: bytes, headers: dict[str, str], status: int, code: str,
        message: str) -> None:
    before = counts(server, "add_one")
    answer = post(server, "/v2/models/add_one/infer", body, headers)
    assert answer.status == status, answer.body[:300]
    assert message in answer.error
    assert grown(before, counts(server, "add_one")) == {("http", code): 1}
    request_id = answer.headers["request-id"]
    if b'"id": "mine"' in body:
        assert request_id == "mine"
    event = failed_event(server, request_id)
    assert (event["model"], event["status"]) == ("add_one", code)
    assert message in event["reason"]


def test_compressed_bodies_are_served_in_every_offered_coding(server: ServerProcess) -> None:
    body = json.dumps(ADD_ONE).encode()
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for coded, coding in ((gzip.compress(body), "gzip"), (zlib.compress(body), "deflate"),
                          (raw.compress(body) + raw.flush(), "deflate"),
                          (gzip.compress(gzip.compress(body)), "gzip, x-gzip"),
                          (body, "identity")):
        answer = post(server, "/v2/models/add_one/infer", coded, {"Content-Encoding": coding})
        assert answer.status == 200, (coding, answer.body[:300])
        assert json.loads(answer.body)["outputs"][0]["data"] == [2, 3, 4, 5]


def test_decode_content_bounds_every_step_and_names_the_coding() -> None:
    body = b"x" * 1000
    assert decode_content(gzip.compress(body), "GZIP", 1000) == body
    assert decode_content(gzip.compress(body) + gzip.compress(b"y"), "gzip", 1001) \
        == body + b"y"  # every gzip member
    assert decode_content(b"", "gzip", 10) == b""
    for coded, coding, limit, status, text in (
            (gzip.compress(body), "gzip", 999, 413, "over the limit of 999 bytes"),
            (gzip.compress(gzip.compress(body)), "gzip, gzip", 999, 413, "limit of 999"),
            (zlib.compress(body) + b"junk", "deflate", 1000, 400,
             "4 bytes after the end of its deflate data"),
            (body, "compress", 1000, 415, "'compress' is not offered"),
            (gzip.compress(body), "gzip, br", 1000, 415, "'br' is not offered")):
        with pytest.raises(HttpFrontEndError) as refused:
            decode_content(coded, coding, limit)
        assert refused.value.status == status and text in str(refused.value)


# --- item 7: answers that cannot be sent are counted under the status the client saw -------

def _wide_request(request_id: str, rows: int = 3) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="wide", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, WIDE])
    request.raw_input_contents.append(np.zeros((rows, WIDE), np.float32).tobytes())
    return request


def test_answers_too_large_for_grpc_are_counted_as_refused(server: ServerProcess) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    before = counts(server, "wide")
    big = 64 * 1024 * 1024  # the client would take it: the server's limit refuses it

    def statistics(stub) -> tuple[int, int]:
        (model,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="wide"),
                                        metadata=metadata, timeout=10).model_stats
        return (model.inference_stats.success.count, model.inference_stats.fail.count)

    with grpc.insecure_channel(server.url, options=[
            ("grpc.max_receive_message_length", big),
            ("grpc.max_send_message_length", big)]) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        success_before, fail_before = statistics(stub)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_wide_request("too-big-unary"), metadata=metadata, timeout=60)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the limit of 4194304 bytes (--max-message-bytes)" in \
            refused.value.details()
        answers = list(stub.ModelStreamInfer(
            iter([_wide_request("too-big-stream"), _wide_request("fits", rows=1)]),
            metadata=metadata, timeout=60))
        success, fail = statistics(stub)
    # Triton's statistics count them as what the client saw too
    assert (success - success_before, fail - fail_before) == (1, 2)
    by_id = {a.infer_response.id: a for a in answers}
    assert "over the limit of 4194304 bytes" in by_id["too-big-stream"].error_message
    assert not by_id["fits"].error_message  # the stream goes on
    assert grown(before, counts(server, "wide")) == {("grpc", "RESOURCE_EXHAUSTED"): 2,
                                                     ("grpc", "OK"): 1}
    for request_id in ("too-big-unary", "too-big-stream"):
        assert failed_event(server, request_id)["status"] == "RESOURCE_EXHAUSTED"


# --- item 9: the Bearer scheme's case -------------------------------------------------------

@pytest.mark.parametrize("sent", [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN}",
                                  f"bEaReR\t{TOKEN}"])
def test_the_bearer_scheme_is_case_insensitive_over_http_and_grpc(
        server: ServerProcess, sent: str) -> None:
    answer = post(server, "/v2/models/add_one/infer", json.dumps(ADD_ONE).encode(),
                  {"Authorization": sent})
    assert answer.status == 200, answer.body[:300]
    if "\t" in sent:
        return  # gRPC metadata values cannot hold a tab (the client refuses to send it)
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.ModelReady(pb.ModelReadyRequest(name="add_one"),
                                metadata=(("authorization", sent),), timeout=10)
    assert ready.ready


@pytest.mark.parametrize(("sent", "message"), [
    ("", "missing authorization"),
    (f"Basic {TOKEN}", "does not use the Bearer scheme"),
    (TOKEN, "does not use the Bearer scheme"),
    ("Bearer", "the Bearer scheme but no token"),
    (f"bearer {TOKEN.upper()}", "the bearer token is not valid"),  # the token's case counts
    (f"Bearer {TOKEN} extra", "the bearer token is not valid"),
])
def test_refused_authorizations_say_what_is_wrong(server: ServerProcess, sent: str,
                                                  message: str) -> None:
    assert bearer_refusal(sent.encode(), TOKEN.encode()) is not None
    answer = post(server, "/v2/models/add_one/infer", json.dumps(ADD_ONE).encode(),
                  {"Authorization": sent})
    assert answer.status == 401 and message in answer.error
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelReady(pb.ModelReadyRequest(name="add_one"),
                            metadata=(("authorization", sent),) if sent else (), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in refused.value.details()
    assert TOKEN not in refused.value.details()  # what was sent is never echoed
