"""Helpers shared by the test modules that start servers: a server of a repository, TLS
certificates and a TLS server, and a repository holding a slow model to fill queues with."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxserve.clients.client import Client, InferenceServerError
from onnxserve.protos import inference_pb2 as pb
from onnxserve.serving.process import ServerProcess, free_port
from support.onnx_models import slow_model
from support.repositories import write_config


def start_server(
    repository: Path, log_path: Path, *extra: str, timeout: float = 60.0,
    token: str | None = None, metrics: bool = False,
) -> ServerProcess:
    """Start `onnxserve serve` on a free localhost port and wait until loading is done
    (every model loaded or failed: tests look at both); with ``metrics`` its Prometheus
    endpoint on another free port (``server.metrics_port``)."""
    server = ServerProcess.serve(repository, *extra, log_path=log_path,
                                 metrics_port=free_port() if metrics else 0)

    def loaded() -> bool:
        try:
            with Client(server.url, timeout=2.0, token=token) as client:
                return all(m["state"] != "LOADING" for m in client.models())
        except InferenceServerError:
            return False

    server.wait_started(timeout, loaded)
    return server


def certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def issue(subject: str, key, issuer_name, issuer_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(name(subject))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test CA", ca_key, name("test CA"), ca_key, True)
    files = {}
    for role, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                  x509.DNSName("localhost")]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(role, key, ca.subject, ca_key, False, san)
        files[f"{role}_key"] = folder / f"{role}.key"
        files[f"{role}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        files[f"{role}_cert"] = folder / f"{role}.crt"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["ca"] = folder / "ca.crt"
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return files


def tls_server(tmp_path: Path, files: dict[str, Path], *extra: str) -> tuple[ServerProcess, str]:
    """Start a TLS server; start_server's readiness probe speaks plaintext, so wait here."""
    server = ServerProcess.serve(tmp_path, "--tls-cert", str(files["server_cert"]),
                                 "--tls-key", str(files["server_key"]), *extra,
                                 log_path=tmp_path / "server.log")
    server.wait_started(60)
    return server, server.url


def slow_repository(folder: Path, queue: int = 0) -> None:
    """A model "slow" (batches of 8, a queue of ``queue`` requests; 0: unbounded)."""
    slow_model(folder / "slow" / "1" / "model.onnx")
    policy = f"default_queue_policy {{ max_queue_size: {queue} }}" if queue else ""
    write_config(folder / "slow", f"max_batch_size: 8\ndynamic_batching {{ {policy} }}\n")


def slow_request() -> pb.ModelInferRequest:
    """One sample for the "slow" model."""
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1024])
    request.raw_input_contents.append(np.ones((1, 1024), np.float32).tobytes())
    return request


def triton_grpc_when(url: str, before: Callable[[], object], *calls: dict) -> list[dict]:
    """As ``triton_grpc``, with the calls made as soon as ``before()`` returned (the
    client process started, imported and connected beforehand)."""
    import json
    import subprocess
    import sys

    from support import SUPPORT

    child = subprocess.Popen([sys.executable, str(SUPPORT / "triton_grpc_calls.py"), url,
                              json.dumps(list(calls)), "--when-told"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready", child.stderr
        before()
        out, err = child.communicate("go\n", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    return json.loads(out)


def triton_grpc(url: str, *calls: dict) -> list[dict]:
    """Run tritonclient.grpc ``calls`` against ``url`` in a process of their own
    (tests/support/triton_grpc_calls.py says what a call is): one result per call."""
    import json
    import subprocess
    import sys

    from support import SUPPORT

    done = subprocess.run([sys.executable, str(SUPPORT / "triton_grpc_calls.py"), url,
                           json.dumps(list(calls))], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
