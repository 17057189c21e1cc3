"""Answers of the HTTP/REST front end: JSON bodies, and the one place a failure becomes an
HTTP status and ``{"error": "..."}``.

``HTTP_STATUS`` maps every canonical error code to an HTTP status (Triton's 400, 404, 503
and 500; the other codes as google.rpc.Code documents their HTTP equivalents; an unknown
code 500). ``HttpFrontEndError`` is a refusal of the HTTP layer itself, whose status may be
no canonical code's. Protobuf messages (a model's configuration) and statistics are written
as Triton's HTTP API writes them.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from onnxserve.serving.errors import ServingError, error_code
from onnxserve.serving.observability.statistics import StatisticDuration, VersionStatistics

#: canonical error code -> HTTP status (an unknown code: 500)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
#: the response header that carries a failed inference request's id
REQUEST_ID_HEADER = "request-id"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_INT64_TYPES = frozenset((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                          FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                          FieldDescriptor.TYPE_SFIXED64))


class HttpFrontEndError(Exception):
    """A request refused by the HTTP layer itself, with an HTTP status that may be no
    canonical code's (413 for a body over the limit, 415 for a content coding not
    offered, 401 without the token) and the canonical code it is counted under in the
    metrics (``code``; by default the one whose status it is, 413's RESOURCE_EXHAUSTED as
    gRPC's for a message over the limit, any other 4xx INVALID_ARGUMENT)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODE_OF_STATUS.get(
            status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


#: HTTP status -> the canonical code counted for it (the first code HTTP_STATUS maps to it)
_CODE_OF_STATUS = {status: code for code, status in reversed(HTTP_STATUS.items())}
_CODE_OF_STATUS[413] = "RESOURCE_EXHAUSTED"


def http_status(code: str) -> int:
    """The HTTP status of a canonical error code."""
    return HTTP_STATUS.get(code, 500)


def json_response(value: object, status: int = 200) -> web.Response:
    """``value`` as a compact JSON body with ``status``."""
    return web.Response(body=_dumps(value).encode(), status=status, content_type=JSON_TYPE)


def error_response(status: int, message: str) -> web.Response:
    """A failure as Triton answers it: ``{"error": message}`` with ``status``."""
    return json_response({"error": message}, status)


def failure(exc: Exception) -> web.Response:
    """The answer to a failed operation: a ServingError's status and message, anything
    else 500 (a bug: the caller logs it)."""
    if isinstance(exc, ServingError):
        return error_response(http_status(exc.code), str(exc))
    return error_response(http_status(error_code(exc)),
                          f"internal error: {type(exc).__name__}: {exc}")


def front_end_failure(exc: HttpFrontEndError) -> web.Response:
    """The answer to a request the HTTP layer refused: its status and message, with
    ``WWW-Authenticate`` on a 401 (RFC 6750 section 3), and the connection closed after a
    413 (the rest of the body is not read)."""
    response = error_response(exc.status, str(exc))
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if exc.status == 413:
        response.force_close()
    return response


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: field names as in the .proto,
    enums by name, 64-bit integers as JSON numbers (protobuf's own JSON mapping writes
    them as strings), fields left at their defaults omitted."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _field_json(value_field, item)
                               for key, item in value.items()}
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_field_json(field, item) for item in value]
        else:
            out[field.name] = _field_json(field, value)
    return out


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name \
            if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", "replace")
    if field.type in _INT64_TYPES:
        return int(value)
    return value


def _duration(duration: StatisticDuration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def statistics_json(stats: VersionStatistics) -> dict[str, Any]:
    """One model version's statistics as Triton's HTTP statistics extension lists them."""
    return {
        "name": stats.name, "version": stats.version, "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": {
            key: _duration(getattr(stats, key))
            for key in ("success", "fail", "queue", "compute_input", "compute_infer",
                        "compute_output")},
        "batch_stats": [
            {"batch_size": batch.batch_size, **{key: _duration(getattr(batch, key))
                                                for key in ("compute_input", "compute_infer",
                                                            "compute_output")}}
            for batch in stats.batches],
    }
