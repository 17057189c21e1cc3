"""Bearer-token authentication and TLS credentials for the gRPC and HTTP servers.

With a token configured, every gRPC call except the health service must carry metadata
``authorization: Bearer <token>`` (else UNAUTHENTICATED before the handler runs), and every
HTTP request except ``/v2/health/live`` and ``/v2/health/ready`` the same ``Authorization``
header (else 401); the scheme's case does not matter (RFC 7235), the token's does. The
comparison takes the same time whatever the token sent. Both servers take the same
certificate and key, and with a client CA both require client certificates it signed.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

#: Methods open without a token: orchestrators probe health without credentials.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: HTTP paths open without a token, for the same reason.
OPEN_HTTP_PATHS = frozenset(("/v2/health/live", "/v2/health/ready"))
#: what a refusal asks for
_EXPECTED = "send 'authorization: Bearer <token>'"


class AuthError(ValueError):
    """The token or TLS files cannot be used."""


def read_token(path: Path) -> bytes:
    """The token in ``path`` (surrounding whitespace removed); AuthError if unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"cannot read the auth token file {path}: {exc}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise AuthError(f"the auth token in {path} must be at least 16 characters without "
                        "spaces")
    return token.encode()


def _refuse(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attribute, make in kinds:
        if getattr(handler, attribute) is not None:
            return make(abort, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise AssertionError("a method handler of no known kind")


def bearer_refusal(sent: bytes, token: bytes) -> str | None:
    """None when ``sent`` (an ``authorization`` header's or metadata value) carries
    ``token`` under the Bearer scheme, else what is wrong, for the caller (never echoing
    what was sent: it may be a secret).

    The scheme is matched without regard to case (RFC 7235 section 2.1: ``bearer`` and
    ``BEARER`` are ``Bearer``), the token exactly and in constant time (RFC 6750 section
    2.1). Spaces or tabs separate them (RFC 7235 asks for spaces; tabs are tolerated, as
    most servers do), and whitespace around the value is ignored (RFC 9110 section 5.5
    trims it from HTTP field values; gRPC metadata keeps it).
    """
    parts = sent.split(None, 1)  # ASCII whitespace: runs of spaces and tabs, both ends
    if not parts:
        return f"missing authorization: {_EXPECTED}"
    if parts[0].lower() != b"bearer":
        return f"the authorization does not use the Bearer scheme: {_EXPECTED}"
    credentials = parts[1].strip() if len(parts) == 2 else b""
    if not credentials:
        return f"the authorization has the Bearer scheme but no token: {_EXPECTED}"
    if hmac.compare_digest(credentials, token):
        return None
    return "the bearer token is not valid"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right ``authorization: Bearer`` metadata."""

    def __init__(self, token: bytes) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = next((v for k, v in details.invocation_metadata or () if k == "authorization"),
                    "")
        sent_bytes = sent.encode() if isinstance(sent, str) else bytes(sent)
        message = bearer_refusal(sent_bytes, self._token)
        return handler if message is None else _refuse(handler, message)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials; with ``client_ca``, clients must present a certificate it signed."""
    try:
        pair = (key.read_bytes(), cert.read_bytes())
        ca = client_ca.read_bytes() if client_ca else None
    except OSError as exc:
        raise AuthError(f"cannot read a TLS file: {exc}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


def ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The HTTP server's TLS context, from the same files as ``server_credentials``.

    Raises:
        AuthError: a file cannot be read, or the certificate and key do not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise AuthError(f"cannot use the TLS files for HTTP: {exc}") from None
    return context
