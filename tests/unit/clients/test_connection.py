"""Reaching a server: addresses, tokens and certificates as users give them, and what a
failed connection is explained as."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from onnxserve.clients.client import channel_target
from onnxserve.clients.connection import (
    ConnectionSettingsError,
    add_connection_arguments,
    clean_token,
    explain_unavailable,
    normalize_url,
    options_from_arguments,
    pem_bytes,
)


@pytest.mark.parametrize(("typed", "target", "tls"), [
    ("localhost:8001", "localhost:8001", None),
    ("localhost", "localhost:8001", None),
    ("10.0.0.5", "10.0.0.5:8001", None),
    ("grpc://host:9001", "host:9001", False),
    ("http://host:8001/", "host:8001", False),
    ("grpcs://host", "host:8001", True),
    ("https://host:443", "host:443", True),
    ("[::1]:8001", "[::1]:8001", None),
    ("[::1]", "[::1]:8001", None),
    ("::1", "[::1]:8001", None),
    ("dns:///svc.ns:8001", "dns:///svc.ns:8001", None),
    ("unix:/run/onnxserve.sock", "unix:/run/onnxserve.sock", None),
    ("  host:8001 ", "host:8001", None),
])
def test_addresses_as_users_type_them(typed: str, target: str, tls: bool | None) -> None:
    assert normalize_url(typed) == (target, tls)


@pytest.mark.parametrize(("typed", "message"), [
    ("", "empty"),
    ("ftp://host:21", "unknown scheme 'ftp'"),
    ("http://host:8001/v2/models", "the gRPC API has no path"),
    ("host:http", "port 'http' is not 1-65535"),
    ("host:70000", "port '70000' is not 1-65535"),
])
def test_addresses_that_cannot_work_are_refused_with_a_hint(typed: str, message: str) -> None:
    with pytest.raises(ConnectionSettingsError, match=message):
        normalize_url(typed)


def test_client_targets_are_normalised() -> None:
    assert channel_target("grpc://127.0.0.1") == "127.0.0.1:8001"
    assert channel_target(["127.0.0.1", "127.0.0.2:9000"]) == "ipv4:127.0.0.1:8001,127.0.0.2:9000"


def test_tokens_from_files_lose_their_newline() -> None:
    assert clean_token("abcdefghijklmnopqrstu\n") == "abcdefghijklmnopqrstu"
    assert clean_token(b" token-from-bytes\r\n") == "token-from-bytes"
    for bad in ("", "  \n", "two words", "tab\tinside", "caf\u00e9"):
        with pytest.raises(ConnectionSettingsError):
            clean_token(bad)


def test_certificates_as_paths_text_or_bytes(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "ca.crt").write_bytes(pem)
    assert pem_bytes(str(tmp_path / "ca.crt"), "root_certificates") == pem
    assert pem_bytes(tmp_path / "ca.crt", "root_certificates") == pem
    assert pem_bytes(pem.decode(), "root_certificates") == pem
    assert pem_bytes(pem, "root_certificates") == pem and pem_bytes(None, "x") is None
    with pytest.raises(ConnectionSettingsError, match="cannot read root_certificates file"):
        pem_bytes(str(tmp_path / "missing.crt"), "root_certificates")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_connection_arguments(parser)
    return parser.parse_args(argv)


def test_options_and_their_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    options = options_from_arguments(_parse("--url", "grpcs://h", "--token-file", str(token)))
    assert (options.url, options.tls, options.token) == ("h:8001", True,
                                                         "s3cret-token-0123456789")
    monkeypatch.setenv("ONNXSERVE_URL", "h2")
    monkeypatch.setenv("ONNXSERVE_TOKEN", "t0k3n-from-the-environment")
    monkeypatch.setenv("ONNXSERVE_SSL", "1")
    options = options_from_arguments(_parse())
    assert (options.url, options.tls, options.token) == ("h2:8001", True,
                                                         "t0k3n-from-the-environment")
    with pytest.raises(ConnectionSettingsError, match="says plaintext"):
        options_from_arguments(_parse("--url", "grpc://h", "--ssl"))
    with pytest.raises(ConnectionSettingsError, match="both --private-key"):
        options_from_arguments(_parse("--private-key", str(token)))


@pytest.mark.parametrize(("details", "tls", "explained"), [
    ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to "
     "connect to remote host: Connection refused", False, "nothing listens at"),
    ("last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed", False, "add --ssl"),
    ("last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed", True, "client certificate"),
    ("Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
     "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate", True,
     "--root-certificates"),
    ("Tls handshake failed: SSL_ERROR_SSL: WRONG_VERSION_NUMBER", True,
     "does not speak TLS"),
    ("errors resolving nosuch.invalid:8001: Domain name not found", False, "cannot resolve"),
])
def test_unavailable_is_explained(details: str, tls: bool, explained: str) -> None:
    assert explained in explain_unavailable(details, "h:8001", tls)
