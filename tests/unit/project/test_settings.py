"""Settings declared once: every field's flag and environment variable reach ServerSettings,
flags win, bad values are refused naming the flag, and workers get the object itself."""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from pathlib import Path

import pytest

from onnxserve.serving.settings import (
    ServerSettings,
    add_setting_arguments,
    env_of,
    flag_of,
    settings_from_arguments,
)

#: a valid non-default value for each field, as text and as ServerSettings holds it
SAMPLES = {
    "model_repository": ("/models", Path("/models")), "grpc_host": ("127.0.0.1", "127.0.0.1"),
    "grpc_port": ("9001", 9001), "grpc_transport": ("python", "python"),
    "http_port": ("9000", 9000), "providers": ("cpu", "cpu"),
    "max_message_bytes": ("8388608", 8388608), "intra_op_threads": ("3", 3),
    "cores": ("2", 2), "spinning": ("off", "off"), "warmup": ("false", False),
    "stage_timing": ("true", True), "event_loop": ("uvloop", "uvloop"),
    "workers": ("3", 3), "model_control_mode": ("poll", "poll"),
    "repository_poll_secs": ("2.5", 2.5), "model_name": ("adder", "adder"),
    "drain_seconds": ("4", 4.0), "max_queue_size": ("7", 7), "metrics_port": ("0", 0),
    "log_level": ("DEBUG", "DEBUG"), "log_format": ("json", "json"),
    "tls_cert": None, "tls_key": None, "tls_client_ca": None,  # together, below
    "auth_token_file": ("/t", Path("/t")),
    "grpc_keepalive_time_ms": ("1000", 1000), "grpc_keepalive_timeout_ms": ("500", 500),
    "grpc_keepalive_permit_without_calls": ("0", False),
    "grpc_http2_max_pings_without_data": ("0", 0),
    "grpc_http2_min_recv_ping_interval_without_data_ms": ("100", 100),
    "grpc_http2_max_ping_strikes": ("2", 2), "load_models": None,
    "strict_readiness": ("false", False), "trace_config": None,
}


def _parse(*argv: str) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    return settings_from_arguments(parser.parse_args(argv))


def test_every_field_is_sampled() -> None:
    assert set(SAMPLES) == {f.name for f in dataclasses.fields(ServerSettings)}


@pytest.mark.parametrize("name", [n for n, v in SAMPLES.items() if v is not None])
def test_each_setting_by_flag_and_by_environment(name: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    text, value = SAMPLES[name]
    switches = {"warmup": ("--no-warmup",), "stage_timing": ("--stage-timing",)}
    argv = switches.get(name, (flag_of(name), text))
    assert getattr(_parse(*argv), name) == value
    monkeypatch.setenv(env_of(name), text)
    assert getattr(_parse(), name) == value


def test_tls_files_by_flag_and_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _parse("--tls-cert", "/c", "--tls-key", "/k", "--tls-client-ca", "/ca")
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (
        Path("/c"), Path("/k"), Path("/ca"))
    for name, value in (("tls_cert", "/c"), ("tls_key", "/k"), ("tls_client_ca", "/ca")):
        monkeypatch.setenv(env_of(name), value)
    assert _parse().tls_client_ca == Path("/ca")


def test_flags_win_and_lists_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSERVE_GRPC_PORT", "9001")
    assert _parse("--grpc-port", "9002").grpc_port == 9002
    assert _parse("--no-warmup").warmup is False
    settings = _parse("--model-control-mode", "explicit", "--load-model", "a",
                      "--load-model", "b")
    assert settings.load_models == ("a", "b") and env_of("load_models") is None
    assert flag_of("grpc_keepalive_time_ms") == "--grpc-keepalive-time"  # Triton's name


@pytest.mark.parametrize(("argv", "message"), [
    (("--workers", "0"), "--workers must be at least 1"),
    (("--grpc-port", "70000"), "--grpc-port must be 0-65535"),
    (("--http-port", "-1"), "--http-port must be 0-65535"),
    (("--drain-seconds", "-1"), "--drain-seconds must be >= 0"),
    (("--load-model", "a"), "--load-model needs --model-control-mode explicit"),
    (("--tls-cert", "/c"), "TLS needs both"),
])
def test_bad_values_name_the_flag(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _parse(*argv)


def test_a_bad_environment_value_is_an_argument_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXSERVE_PROVIDERS", "gpu")
    with pytest.raises(ValueError, match="--providers must be one of auto, cpu, cuda"):
        _parse()
    monkeypatch.setenv("ONNXSERVE_PROVIDERS", "cpu")
    monkeypatch.setenv("ONNXSERVE_CORES", "many")
    with pytest.raises(SystemExit):
        _parse()


def test_workers_receive_the_settings_object() -> None:
    settings = _parse("--workers", "2", "--grpc-port", "9001", "--no-warmup")
    assert pickle.loads(pickle.dumps(settings)) == settings  # what spawn hands each worker


def test_uvloop_without_the_package_is_refused_by_name(monkeypatch) -> None:
    import importlib.util

    from onnxserve.serving.settings import ServerSettings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvloop" else real(name, *a))
    with pytest.raises(ValueError, match=r"--event-loop uvloop needs the uvloop package"):
        ServerSettings(event_loop="uvloop")
