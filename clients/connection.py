"""How a client reaches a server: the address, TLS, the bearer token, and what went wrong.

Shared by the client library, ``clients/classify.py`` and ``onnxserve health``, so every tool
takes the same options (tritonclient's names where it has them) and the same environment
variables, and explains a failed connection the same way.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxserve.protos.naming import plain_int

DEFAULT_PORT = 8001
DEFAULT_URL = f"localhost:{DEFAULT_PORT}"
#: gRPC target forms passed through as they are (name resolvers and socket kinds)
_RESOLVER_PREFIXES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
#: URL schemes people write for a gRPC address, and whether each means TLS
_SCHEMES = {"grpc": False, "http": False, "grpcs": True, "https": True}
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>.*))?$")

#: environment variables of the connection options
ENV = {
    "url": "ONNXSERVE_URL",
    "token": "ONNXSERVE_TOKEN",
    "token_file": "ONNXSERVE_TOKEN_FILE",
    "ssl": "ONNXSERVE_SSL",
    "root_certificates": "ONNXSERVE_ROOT_CERTIFICATES",
    "private_key": "ONNXSERVE_PRIVATE_KEY",
    "certificate_chain": "ONNXSERVE_CERTIFICATE_CHAIN",
    "ssl_target_name": "ONNXSERVE_SSL_TARGET_NAME",
}


class ConnectionSettingsError(ValueError):
    """An address, token or certificate option cannot be used; the message says why."""


def normalize_url(url: str) -> tuple[str, bool | None]:
    """A gRPC target for what a user typed, and whether its scheme asks for TLS.

    ``host:port`` and ``[v6]:port`` stay; a missing port becomes 8001 (gRPC's own default
    would be 443); ``grpc://`` and ``http://`` mean plaintext, ``grpcs://`` and ``https://``
    TLS (returned as True/False; None: the address does not say); ``dns:///``, ``ipv4:``,
    ``unix:`` and other gRPC targets pass through.

    Raises:
        ConnectionSettingsError: an empty address, an unknown scheme, a path after the
            address, or a port that is not 1-65535, with a hint.
    """
    text = url.strip()
    if not text:
        raise ConnectionSettingsError("the server address is empty; give HOST:PORT, e.g. "
                                      f"{DEFAULT_URL}")
    if text.startswith(_RESOLVER_PREFIXES):
        return text, None
    tls: bool | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() not in _SCHEMES:
            raise ConnectionSettingsError(
                f"address {url!r}: unknown scheme {scheme!r}; give HOST:PORT (or grpc://, "
                "grpcs://, http://, https://)")
        tls = _SCHEMES[scheme.lower()]
        host_port, _, path = text.partition("/")
        if path.strip("/"):
            raise ConnectionSettingsError(
                f"address {url!r}: the gRPC API has no path ({'/' + path!r}); give only "
                "HOST:PORT")
        text = host_port
    match = _HOST_PORT.match(text)
    if match is None:
        if text.count(":") > 1 and "[" not in text:  # a bare IPv6 address
            return f"[{text}]:{DEFAULT_PORT}", tls
        raise ConnectionSettingsError(f"address {url!r} is not HOST:PORT")
    host = f"[{match['v6']}]" if match["v6"] else match["host"]
    port = match["port"]
    if port is None or port == "":
        return f"{host}:{DEFAULT_PORT}", tls
    number = plain_int(port, 65535)
    if not number:
        raise ConnectionSettingsError(f"address {url!r}: port {port!r} is not 1-65535")
    return f"{host}:{number}", tls


def clean_token(token: str | bytes) -> str:
    """A bearer token as sent: surrounding whitespace (a file's newline) removed.

    Raises:
        ConnectionSettingsError: an empty token, or one with spaces or control characters
            inside (gRPC refuses such metadata with an opaque error).
    """
    text = token.decode("utf-8", "replace") if isinstance(token, bytes) else token
    text = text.strip()
    if not text:
        raise ConnectionSettingsError("the bearer token is empty")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in text):
        raise ConnectionSettingsError("the bearer token has spaces or non-printable or "
                                      "non-ASCII characters inside; expected one word")
    return text


def read_token_file(path: str | Path) -> str:
    """The token in a file (as ``onnxserve serve --auth-token-file`` reads it)."""
    try:
        return clean_token(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConnectionSettingsError(f"cannot read the token file {path}: "
                                      f"{exc.strerror}") from None


def pem_bytes(value: bytes | str | Path | None, what: str) -> bytes | None:
    """PEM data given as bytes, as PEM text, or as a file path (tritonclient takes paths).

    Raises:
        ConnectionSettingsError: naming the option and the file that cannot be read.
    """
    if value is None or isinstance(value, bytes):
        return value
    text = str(value)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise ConnectionSettingsError(f"cannot read {what} file {text}: "
                                      f"{exc.strerror}") from None


@dataclass(frozen=True)
class ConnectionOptions:
    """Everything needed to reach one server, as the command-line tools take it."""

    url: str = DEFAULT_URL
    token: str | None = None
    ssl: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    #: the name to check the server's certificate against, when the address differs
    ssl_target_name: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.ssl or self.root_certificates or self.private_key
                    or self.certificate_chain)

    def client_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``Client``."""
        return {"token": self.token, "tls": self.tls,
                "root_certificates": self.root_certificates, "private_key": self.private_key,
                "certificate_chain": self.certificate_chain,
                "ssl_target_name": self.ssl_target_name}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_connection_arguments(parser: argparse.ArgumentParser,
                             default_url: str = DEFAULT_URL) -> None:
    """--url, --token, --token-file, --ssl, --root-certificates, --private-key,
    --certificate-chain, --ssl-target-name, each with its ONNXSERVE_* variable."""
    group = parser.add_argument_group("connection")
    group.add_argument("--url", default=os.environ.get(ENV["url"]) or default_url,
                       help=f"server address HOST:PORT (grpc:// or grpcs:// accepted; env "
                            f"{ENV['url']}; default %(default)s)")
    token = group.add_mutually_exclusive_group()
    token.add_argument("--token", default=os.environ.get(ENV["token"]) or None,
                       help=f"bearer token (env {ENV['token']}); prefer --token-file, which "
                            "keeps it out of the process list")
    token.add_argument("--token-file", default=os.environ.get(ENV["token_file"]) or None,
                       help=f"file holding the bearer token (env {ENV['token_file']})")
    group.add_argument("--ssl", action="store_true", default=_env_flag(ENV["ssl"]),
                       help=f"connect over TLS (env {ENV['ssl']}=1; implied by the options "
                            "below and by grpcs://)")
    group.add_argument("--root-certificates", default=os.environ.get(ENV["root_certificates"]),
                       help="PEM file of the CA(s) to verify the server with (default: the "
                            f"system's; env {ENV['root_certificates']})")
    group.add_argument("--private-key", default=os.environ.get(ENV["private_key"]),
                       help=f"PEM client key, for mutual TLS (env {ENV['private_key']})")
    group.add_argument("--certificate-chain", default=os.environ.get(ENV["certificate_chain"]),
                       help="PEM client certificate chain, for mutual TLS (env "
                            f"{ENV['certificate_chain']})")
    group.add_argument("--ssl-target-name", default=os.environ.get(ENV["ssl_target_name"]),
                       help="the name the server's certificate must carry, when --url uses "
                            f"another (e.g. 127.0.0.1 in a container; env "
                            f"{ENV['ssl_target_name']})")


def options_from_arguments(args: argparse.Namespace) -> ConnectionOptions:
    """The parsed connection options, files read.

    Raises:
        ConnectionSettingsError: naming the option that cannot be used.
    """
    url, scheme_tls = normalize_url(args.url)
    if scheme_tls is False and (args.ssl or args.root_certificates):
        raise ConnectionSettingsError(f"address {args.url!r} says plaintext but TLS options "
                                      "are given; use grpcs:// or HOST:PORT")
    token = (read_token_file(args.token_file) if args.token_file
             else clean_token(args.token) if args.token else None)
    if bool(args.private_key) != bool(args.certificate_chain):
        raise ConnectionSettingsError("mutual TLS needs both --private-key and "
                                      "--certificate-chain")
    return ConnectionOptions(
        url=url, token=token, ssl=bool(args.ssl or scheme_tls),
        root_certificates=pem_bytes(args.root_certificates, "--root-certificates"),
        private_key=pem_bytes(args.private_key, "--private-key"),
        certificate_chain=pem_bytes(args.certificate_chain, "--certificate-chain"),
        ssl_target_name=args.ssl_target_name or None,
    )


def explain_unavailable(message: str, url: str, tls: bool) -> str:
    """What a gRPC UNAVAILABLE answer means for the user, and what to try.

    ``message`` is the status details gRPC gave; the wording of gRPC's C core is matched.
    """
    text = message.lower()
    if "connection refused" in text:
        return (f"nothing listens at {url} (connection refused): start a server (`make "
                "serve`) or check --url")
    if "resolving" in text or "domain name not found" in text or "dns" in text:
        return f"cannot resolve the host of {url}: check --url"
    if "wrong_version_number" in text:
        return (f"the TLS handshake with {url} failed: the server does not speak TLS; drop "
                "--ssl and the certificate options")
    if "certificate_verify_failed" in text or "handshake failed" in text:
        return (f"the TLS handshake with {url} failed: the server's certificate is not "
                "trusted or not for this name; give the CA with --root-certificates (and "
                "the certificate's name with --ssl-target-name)")
    if "socket closed" in text or "connection reset" in text:
        if tls:
            return (f"the server at {url} closed the TLS connection: it may want a client "
                    "certificate (--private-key and --certificate-chain)")
        return (f"the server at {url} closed the connection: if it serves TLS, add --ssl "
                "(and --root-certificates)")
    if "deadline" in text or "timeout" in text:
        return f"no answer from {url} in time: the server may be overloaded or unreachable"
    return f"the server at {url} is unavailable: {message}"
