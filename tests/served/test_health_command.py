"""`onnxserve health`, the container HEALTHCHECK: every documented mode, clear failures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.repositories import build_test_models
from support.served import certificates, start_server, tls_server

from onnxserve.serving.process import free_port, onnxserve_command


def health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ONNXSERVE_")}
    return subprocess.run(onnxserve_command("health", *args), capture_output=True, text=True,
                          timeout=60, env={**clean, **(env or {})})


def test_plain_server_model_and_failures(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        ok = health("--url", server.url)
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
        by_env = health(env={"ONNXSERVE_URL": server.url})  # as classify.py honours it
        assert by_env.returncode == 0, by_env.stderr
        model = health("--url", server.url, "--service", "echo")
        assert model.returncode == 0
        missing = health("--url", server.url, "--service", "nope")
        assert missing.returncode == 1 and "knows no model 'nope'" in missing.stderr
    finally:
        server.stop()
    refused = health("--url", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 1 and "connection refused" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_not_serving_says_which(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    server = start_server(tmp_path / "empty", tmp_path / "server.log")
    try:
        result = health("--url", server.url)
        assert result.returncode == 1 and result.stdout.strip() == "NOT_SERVING"
        assert "the server at" in result.stderr and "is NOT_SERVING" in result.stderr
    finally:
        server.stop()


def test_tls_and_mutual_tls_servers_from_the_environment(tmp_path: Path) -> None:
    build_test_models(tmp_path)
    files = certificates(tmp_path)
    process, url = tls_server(tmp_path, files)
    try:
        plain = health("--url", url)
        assert plain.returncode == 1 and "add --ssl" in plain.stderr
        untrusted = health("--url", url, "--ssl")
        assert untrusted.returncode == 1 and "--root-certificates" in untrusted.stderr
        trusted = health(env={"ONNXSERVE_URL": url, "ONNXSERVE_ROOT_CERTIFICATES":
                              str(files["ca"])})
        assert trusted.returncode == 0, trusted.stderr
        # A container checks itself by IP while the certificate names its host.
        named = health("--url", url.replace("127.0.0.1", "localhost"), "--root-certificates",
                       str(files["ca"]), "--ssl-target-name", "localhost")
        assert named.returncode == 0, named.stderr
    finally:
        process.stop()
    process, url = tls_server(tmp_path, files, "--tls-client-ca", str(files["ca"]))
    try:
        anonymous = health("--url", url, "--root-certificates", str(files["ca"]))
        assert anonymous.returncode == 1 and "client certificate" in anonymous.stderr
        mutual = health(env={
            "ONNXSERVE_URL": url, "ONNXSERVE_ROOT_CERTIFICATES": str(files["ca"]),
            "ONNXSERVE_PRIVATE_KEY": str(files["client_key"]),
            "ONNXSERVE_CERTIFICATE_CHAIN": str(files["client_cert"])})
        assert mutual.returncode == 0, mutual.stderr
    finally:
        process.stop()


def test_the_images_healthcheck_reads_the_servers_environment(tmp_path: Path) -> None:
    """The Dockerfiles run a bare `onnxserve health` beside the server, with its environment."""
    build_test_models(tmp_path)
    server = start_server(tmp_path, tmp_path / "server.log")
    try:
        port = server.url.rsplit(":", 1)[1]
        assert health(env={"ONNXSERVE_GRPC_PORT": port}).returncode == 0
    finally:
        server.stop()
    files = certificates(tmp_path)
    process, url = tls_server(tmp_path, files)
    try:
        server_env = {"ONNXSERVE_GRPC_PORT": url.rsplit(":", 1)[1],
                      "ONNXSERVE_TLS_CERT": str(files["server_cert"]),
                      "ONNXSERVE_TLS_KEY": str(files["server_key"])}
        assert "add --ssl" not in health(env=server_env).stderr  # TLS is used
        trusted = health(env={**server_env, "ONNXSERVE_ROOT_CERTIFICATES": str(files["ca"])})
        assert trusted.returncode == 0, trusted.stderr
    finally:
        process.stop()
