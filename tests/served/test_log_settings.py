"""The logging extension (Triton's LogSettings keys over onnxserve's level threshold and
formats) and TraceSetting's answer: in this process, then on a server with tritonclient."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import SUPPORT

from onnxserve.protos import inference_pb2 as pb
from onnxserve.protos import inference_pb2_grpc
from onnxserve.serving.errors import InvalidInputError
from onnxserve.serving.observability import logs
from onnxserve.serving.process import ServerProcess

pytestmark = pytest.mark.grpc  # run over both gRPC transports (make test)


@pytest.fixture
def configured() -> Iterator[None]:
    """Logging as the server configures it (INFO, text), put back afterwards."""
    root = logging.getLogger()
    handlers, level, before = root.handlers[:], root.level, logs._configured
    logs.configure("INFO", "text")
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._configured = before


def test_settings_read_as_tritons_keys(configured: None) -> None:
    assert logs.log_settings() == {
        "log_file": "", "log_info": True, "log_warning": True, "log_error": True,
        "log_verbose_level": 0, "log_format": "text"}
    logs.configure("DEBUG", "json")
    assert logs.log_settings() == {
        "log_file": "", "log_info": True, "log_warning": True, "log_error": True,
        "log_verbose_level": 1, "log_format": "json"}


@pytest.mark.parametrize(("updates", "level"), [
    ({"log_verbose_level": 2}, logging.DEBUG),
    ({"log_verbose_level": 0}, logging.INFO),
    ({"log_info": False}, logging.WARNING),
    ({"log_warning": False}, logging.ERROR),
    ({"log_error": False}, logging.CRITICAL),
    ({"log_info": False, "log_warning": True}, logging.WARNING),
    ({"log_error": True}, logging.INFO),
    ({"log_file": ""}, logging.INFO),
])
def test_each_key_moves_the_level_threshold(configured: None, updates: dict,
                                            level: int) -> None:
    after = logs.update_log_settings(updates)
    assert logging.getLogger().level == level
    assert after == logs.log_settings()
    for key, value in updates.items():
        assert bool(after[key]) == bool(value) if key != "log_file" else after[key] == ""


def test_turning_a_severity_on_turns_on_the_more_severe_ones(configured: None) -> None:
    logs.update_log_settings({"log_error": False})
    after = logs.update_log_settings({"log_info": True})
    assert (after["log_info"], after["log_warning"], after["log_error"]) == (True, True, True)


def test_the_format_changes_the_running_handler(configured: None) -> None:
    assert logs._configured is not None
    handler = logs._configured.handler
    assert isinstance(handler, logging.StreamHandler)
    written = io.StringIO()
    handler.setStream(written)
    logs.update_log_settings({"log_format": "json"})
    assert logs._configured.handler is handler
    logs.event(logging.getLogger("onnxserve.test"), logging.WARNING, "something",
               model="m")
    line = json.loads(written.getvalue().splitlines()[-1])
    assert (line["event"], line["model"], line["level"]) == ("something", "m", "WARNING")
    logs.update_log_settings({"log_format": "text"})
    logging.getLogger("onnxserve.test").warning("plain")
    assert written.getvalue().splitlines()[-1].endswith("WARNING onnxserve.test: plain")


@pytest.mark.parametrize(("updates", "message"), [
    ({"log_level": "DEBUG"}, "unknown log setting(s) 'log_level'; the log settings are "
                             "log_file, log_info,"),
    ({"log_info": 1}, "'log_info' must be a boolean, got 1"),
    ({"log_info": None}, "'log_info' must be a boolean, got None"),
    ({"log_verbose_level": -1}, "'log_verbose_level' must be an integer >= 0, got -1"),
    ({"log_verbose_level": True}, "'log_verbose_level' must be an integer >= 0"),
    ({"log_format": "ISO8601"}, "'log_format' must be one of text, json, got 'ISO8601'"),
    ({"log_file": "/var/log/x"}, "'log_file' can only be \"\" (standard error)"),
    ({"log_info": True, "log_warning": False},
     "log settings log_warning=False, log_info=True contradict each other"),
    ({"log_verbose_level": 1, "log_info": False}, "contradict each other"),
])
def test_bad_updates_are_refused_and_change_nothing(configured: None, updates: dict,
                                                    message: str) -> None:
    before = logs.log_settings()
    with pytest.raises(InvalidInputError) as error:
        logs.update_log_settings({"log_format": "json", **updates})
    assert message in str(error.value)
    assert logs.log_settings() == before
    assert logging.getLogger().level == logging.INFO


# --- a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(test_models_server: ServerProcess) -> ServerProcess:
    return test_models_server


def test_log_settings_rpc_changes_the_server_and_says_so(server, tmp_path: Path) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.LogSettingsRequest()
        request.settings["log_format"].string_param = "json"
        request.settings["log_info"].bool_param = False
        response = stub.LogSettings(request, timeout=10)
        assert response.settings["log_format"].string_param == "json"
        assert response.settings["log_info"].bool_param is False
        assert response.settings["log_warning"].bool_param is True
        assert response.settings["log_verbose_level"].uint32_param == 0
        unset = pb.LogSettingsRequest()
        unset.settings["log_error"].SetInParent()
        with pytest.raises(grpc.RpcError) as error:
            stub.LogSettings(unset, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'log_error' must be a boolean, got None" in error.value.details()
        put_back = pb.LogSettingsRequest()
        put_back.settings["log_format"].string_param = "text"
        put_back.settings["log_info"].bool_param = True
        stub.LogSettings(put_back, timeout=10)
    changes = [json.loads(line) for line in server.output().splitlines()
               if line.startswith("{") and "log_settings_changed" in line]
    assert changes and changes[0]["log_format"] == "json" and changes[0]["log_info"] is False
    assert "log_settings_changed log_info=True log_format=text" in server.output()


def test_tritonclient_log_and_trace_settings(server) -> None:
    result = subprocess.run(
        [sys.executable, str(SUPPORT / "triton_stream_interop.py"), server.url,
         "logging"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)

    def plain(settings: dict) -> dict:
        return {k: next(iter(v.values())) for k, v in settings.items()}

    assert plain(r["initial"]) == {"log_file": "", "log_info": True, "log_warning": True,
                                   "log_error": True, "log_verbose_level": 0,
                                   "log_format": "text"}
    assert plain(r["verbose"])["log_verbose_level"] == 1
    assert plain(r["verbose"])["log_format"] == "json"
    assert plain(r["read_back"]) == plain(r["verbose"])
    for label, answer in r["refused"].items():
        assert answer is not None and answer[0] == "StatusCode.INVALID_ARGUMENT", label
    assert plain(r["after_refusals"]) == plain(r["verbose"])
    assert plain(r["restored"]) == plain(r["initial"])
    assert r["trace"]["trace_level"] == {"value": ["OFF"]}  # tracing: test_tracing_served.py
