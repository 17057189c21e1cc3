"""Triton's flags on `onnxserve serve`: aliases with Triton's meaning and value syntax, the
others refused with serve's usage and onnxserve's equivalent, and docs/triton.md listing
every one of them."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from support.doc_pages import docs_pages

from onnxserve.serving.cli import build_parser, main
from onnxserve.serving.settings import ServerSettings, settings_from_arguments
from onnxserve.serving.triton_flags import ALIASES, REFUSED, apply_triton_tls


def _serve_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["serve"]


def _settings(*flags: str) -> ServerSettings:
    parser = _serve_parser()
    args = parser.parse_args(list(flags))
    apply_triton_tls(parser, args)
    return settings_from_arguments(args)


def _refusal(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(["serve", *flags])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: onnxserve serve"), err  # serve's usage, not the top level's
    return err


def test_aliases_set_what_the_triton_flag_means(tmp_path: Path) -> None:
    settings = _settings("--model-store", str(tmp_path), "--exit-timeout-secs=7",
                         "--allow-http", "false", "--allow-metrics=0", "--allow-grpc", "true",
                         "--log-verbose", "1", "--grpc-address", "127.0.0.1",
                         "--http-address=127.0.0.1", "--strict-readiness=false",
                         "--log-format", "ISO8601")
    assert settings.model_repository == tmp_path
    assert settings.drain_seconds == 7.0
    assert settings.http_port == 0 and settings.metrics_port == 0
    assert settings.log_level == "DEBUG" and settings.log_format == "text"
    assert settings.grpc_host == "127.0.0.1"
    assert settings.strict_readiness is False
    defaults = _settings("--allow-http", "on", "--allow-metrics", "1", "--log-verbose", "0")
    assert defaults.http_port == 8000 and defaults.metrics_port == 8002
    assert defaults.log_level == "INFO" and defaults.strict_readiness is True
    assert _settings("--log-info", "false").log_level == "WARNING"
    assert _settings("--log-warning", "false").log_level == "ERROR"
    assert _settings("--log-level", "ERROR", "--log-info", "false").log_level == "ERROR"
    assert _settings("--strict-readiness").strict_readiness is True


def test_tls_flags_are_read_together_as_triton_reads_them(tmp_path: Path) -> None:
    cert, key, ca = (tmp_path / name for name in ("s.crt", "s.key", "ca.crt"))
    files = ("--grpc-server-cert", str(cert), "--grpc-server-key", str(key))
    unused = _settings(*files)  # without --grpc-use-ssl Triton leaves them unused
    assert unused.tls_cert is None and unused.tls_key is None
    tls = _settings("--grpc-use-ssl", "true", *files, "--grpc-root-cert", str(ca))
    assert (tls.tls_cert, tls.tls_key, tls.tls_client_ca) == (cert, key, None)
    mutual = _settings("--grpc-use-ssl-mutual=1", *files, "--grpc-root-cert", str(ca))
    assert (mutual.tls_cert, mutual.tls_key, mutual.tls_client_ca) == (cert, key, ca)


@pytest.mark.parametrize(("flags", "said"), [
    (("--grpc-use-ssl", "true"), "--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key"),
    (("--grpc-use-ssl-mutual", "true", "--grpc-server-cert", "a", "--grpc-server-key", "b"),
     "--grpc-use-ssl-mutual needs --grpc-root-cert"),
    (("--allow-grpc", "false"), "onnxserve always serves gRPC"),
    (("--allow-http", "maybe"), "--allow-http: expected true or false"),
    (("--grpc-address", "127.0.0.1", "--http-address", "0.0.0.0"),
     "onnxserve listens on one address for all its ports, and 127.0.0.1 was given"),
    (("--log-format", "xml"), "expected text or json (or Triton's default, ISO8601)"),
    (("--model-store",), "expected one argument"),
    (("--no-such-flag", "1"), "unrecognized arguments: --no-such-flag 1"),
])
def test_bad_values_are_refused_with_serves_usage(capsys: pytest.CaptureFixture[str],
                                                  flags: tuple[str, ...], said: str) -> None:
    assert said in _refusal(capsys, *flags)


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_triton_flags_without_a_meaning_here_name_the_equivalent(
        capsys: pytest.CaptureFixture[str], flag: str) -> None:
    err = _refusal(capsys, f"{flag}=1")
    assert f"{flag} is Triton's and onnxserve has no such setting: {REFUSED[flag]}" in err


def test_other_commands_say_unknown_flags_with_their_own_usage(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["health", "--model-store", "x"])
    err = capsys.readouterr().err
    assert err.startswith("usage: onnxserve health") and "unrecognized arguments" in err


def test_the_triton_page_lists_every_triton_flag() -> None:
    (page,) = [p for p in docs_pages() if p.name == "triton.md"]
    text = page.read_text()
    table = text.split("| Triton flag | onnxserve |", 1)[1].split("\n\n", 1)[0]
    listed = {flag for line in table.splitlines()[2:]
              for flag in re.findall(r"`(--[a-z0-9-]+)", line.split("|")[1])}
    assert listed == set(ALIASES) | set(REFUSED), (sorted(set(ALIASES) | set(REFUSED) - listed),
                                                   sorted(listed - set(ALIASES) - set(REFUSED)))


def test_a_value_an_alias_cannot_take_is_a_usage_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--exit-timeout-secs: not a value it takes: 'soon'" in _refusal(
        capsys, "--exit-timeout-secs", "soon")
    monkeypatch.setenv("ONNXSERVE_LOG_LEVEL", "info")  # as typed, before its conversion
    assert _settings("--log-info", "false").log_level == "WARNING"
