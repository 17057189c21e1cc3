"""Reading an HTTP request body: the size limit and the content codings.

A body larger than the limit (``--max-message-bytes``) is refused with 413 before it is
read when its Content-Length says so, and as soon as it passes the limit when it comes
chunked or compressed. gzip and deflate request bodies are accepted (counted after
decompression); other content codings get 415, a body that is not what its coding says
400. aiohttp's own decompression is off (http_service.py): it would answer a coding it does
not know with its own 400, and a traceback in the log, before any route runs.
"""

from __future__ import annotations

import zlib

from aiohttp import http_exceptions, web

from onnxserve.serving.frontends.http_answers import HttpFrontEndError
from onnxserve.serving.frontends.http_codec import parse_header

#: the content codings a request body may have (RFC 9110 section 8.4.1; "x-gzip" is gzip)
CONTENT_CODINGS = ("gzip", "deflate")



def decode_content(body: bytes, content_encoding: str, limit: int) -> bytes:
    """``body`` decoded as its ``Content-Encoding`` header says: a list of the codings
    applied in order (RFC 9110 section 8.4), undone in reverse. ``identity`` is no coding;
    ``deflate`` is zlib data (RFC 9110 section 8.4.1.2), raw deflate data accepted too as
    most servers do. The decoded body may not pass ``limit`` bytes (nor may any step of it:
    a small compressed body cannot fill the memory).

    Raises:
        HttpFrontEndError: 415 for a coding not offered (naming it and those offered), 400
            for a body that is not what its coding says (naming the coding), 413 when the
            decoded body passes ``limit``.
    """
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not body:  # no content: nothing was coded
        return body
    for coding in reversed(codings):
        if coding not in (*CONTENT_CODINGS, "x-gzip"):
            raise HttpFrontEndError(
                415, f"the request body's Content-Encoding {coding[:40]!r} is not offered: "
                     f"send it as is, or with {' or '.join(CONTENT_CODINGS)}")
        if coding == "deflate":
            raw = body[:1] and body[0] & 0x0F != 8  # no zlib header: raw deflate data
            wbits = -zlib.MAX_WBITS if raw else zlib.MAX_WBITS
        else:
            wbits = 16 + zlib.MAX_WBITS
        body = _inflate(body, coding, wbits, limit)
    return body


def _inflate(data: bytes, coding: str, wbits: int, limit: int) -> bytes:
    """Decompress ``data`` (gzip: every member) up to ``limit`` bytes."""
    pieces: list[bytes] = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            piece = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise HttpFrontEndError(
                400, f"the request body is not {coding} data as its Content-Encoding says "
                     f"({exc})") from None
        pieces.append(piece)
        size += len(piece)
        if size > limit or inflater.unconsumed_tail:
            raise HttpFrontEndError(413, f"the request body is over the limit of {limit} "
                                         f"bytes (--max-message-bytes) once {coding} "
                                         "decoded")
        if not inflater.eof:
            raise HttpFrontEndError(400, f"the request body's {coding} data is cut short "
                                         "(its end is missing)")
        data = inflater.unused_data
        if not data:
            return b"".join(pieces)
        if wbits != 16 + zlib.MAX_WBITS:
            raise HttpFrontEndError(400, f"the request body has {len(data)} bytes after "
                                         f"the end of its {coding} data")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, decoded as its Content-Encoding says (decode_content), at
    most ``limit`` bytes (``--max-message-bytes``) sent and decoded.

    Raises:
        HttpFrontEndError: 413 past the limit (sent or decoded), 415 for a content
            coding not offered, 400 for a body that cannot be read (bad chunk framing,
            shorter than its Content-Length) or decoded: every failure to read a body
            is the client's.
    """
    if request.content_length is not None and request.content_length > limit:
        raise HttpFrontEndError(413, f"the request body is {request.content_length} "
                                     f"bytes, over the limit of {limit} bytes "
                                     "(--max-message-bytes)")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        body = None
    except ConnectionError:  # the client left: nobody reads the answer
        raise HttpFrontEndError(400, "the connection closed before the whole request "
                                     "body came", code="CANCELLED") from None
    except (http_exceptions.HttpProcessingError, web.RequestPayloadError) as exc:
        # bad chunk framing, a body cut short, ...: aiohttp's parser error comes
        # wrapped in a RequestPayloadError
        cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
        detail = (cause.message if isinstance(cause, http_exceptions.HttpProcessingError)
                  else str(exc))
        raise HttpFrontEndError(400, f"the request body cannot be read: "
                                     f"{detail}") from None
    if body is None or len(body) > limit:
        raise HttpFrontEndError(413, f"the request body is over the limit of {limit} "
                                     "bytes (--max-message-bytes)")
    encoding = ",".join(request.headers.getall("Content-Encoding", ()))
    return decode_content(body, encoding, limit) if encoding else body


async def read_json_body(request: web.Request, limit: int) -> dict:
    """The request body as a JSON object (read_body, then http_codec.parse_header); an empty
    body is ``{}``."""
    body = await read_body(request, limit)
    return parse_header(body) if body.strip() else {}
