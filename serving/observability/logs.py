"""Log set-up and structured events: one line per event, as key=value text or as JSON.

``event(log, logging.INFO, "model_loaded", model="lenet5", versions="1")`` writes
``model_loaded model=lenet5 versions=1`` with the text format, and a JSON object with
``event``, ``model`` and ``versions`` keys with ``--log-format json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


def event(logger: logging.Logger, level: int, name: str, **fields: object) -> None:
    """Log one structured event."""
    if logger.isEnabledFor(level):
        text = " ".join(f"{key}={_quote(value)}" for key, value in fields.items())
        logger.log(level, "%s %s", name, text, extra={"event": name, "fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, the process (``worker`` with
    --workers N), and the event's fields or message."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        if self._process is not None:
            out["worker"] = self._process
        name = getattr(record, "event", None)
        if name is not None:
            out["event"] = name
            out.update({k: v if isinstance(v, int | float | bool) or v is None else str(v)
                        for k, v in getattr(record, "fields", {}).items()})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "INFO", fmt: str = "text", process: str | None = None) -> None:
    """Send logs to stderr in ``fmt`` (text or json) at ``level``.

    ``process`` names this process among the server's (``worker 1``, ``supervisor``) in
    every line: ``[worker 1]`` in text, a ``worker`` field in JSON; None for a lone server.
    """
    handler = logging.StreamHandler(sys.stderr)
    text = _TEXT_FORMAT if process is None else _TEXT_FORMAT.replace(
        "%(name)s", f"[{process}] %(name)s")
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else logging.Formatter(text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
