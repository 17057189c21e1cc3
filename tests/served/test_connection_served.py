"""Reaching a TLS server that wants a token and a client certificate, with the token in a file
and the certificates as paths (how users give them: tests/unit/clients/test_connection.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.served import certificates, tls_server

from onnxserve.clients.client import Client, InferenceServerError


def test_client_with_a_token_file_and_certificate_paths(tmp_path: Path) -> None:
    files = certificates(tmp_path)
    token = tmp_path / "token"
    token.write_text("a-long-enough-bearer-token\n")
    from support.repositories import build_test_models

    build_test_models(tmp_path)
    process, url = tls_server(tmp_path, files, "--auth-token-file", str(token),
                               "--tls-client-ca", str(files["ca"]))
    try:
        # Paths, as tritonclient takes them, and the token as a file holds it.
        with Client(url, token=token.read_text(), root_certificates=str(files["ca"]),
                    private_key=files["client_key"], certificate_chain=str(files["client_cert"]),
                    timeout=10) as client:
            assert client.is_server_ready() and "echo" in [m["name"] for m in client.models()]
        with Client(url, root_certificates=str(files["ca"]), private_key=files["client_key"],
                    certificate_chain=files["client_cert"], timeout=10) as client, \
                pytest.raises(InferenceServerError, match="UNAUTHENTICATED"):
            client.models()
    finally:
        process.stop()
