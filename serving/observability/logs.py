"""Log set-up and structured events: one line per event, as key=value text or as JSON.

``event(log, logging.INFO, "model_loaded", model="lenet5", versions="1")`` writes
``model_loaded model=lenet5 versions=1`` with the text format, and a JSON object with
``event``, ``model`` and ``versions`` keys with ``--log-format json``.

``log_settings`` and ``update_log_settings`` read and change the level and the format of the
running process under Triton's log settings keys (its LogSettings RPC and ``/v2/logging``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from onnxserve.serving.errors import INTERNAL, InvalidInputError
from onnxserve.serving.settings import LogFormat

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


def _formatter(fmt: str, process: str | None) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(process)
    return logging.Formatter(_TEXT_FORMAT if process is None else _TEXT_FORMAT.replace(
        "%(name)s", f"[{process}] %(name)s"))


@dataclass
class _Configured:
    """What configure() installed: the handler whose format a settings update changes."""

    handler: logging.Handler
    format: str
    process: str | None


_configured: _Configured | None = None


def configure(level: str = "INFO", fmt: str = "text", process: str | None = None) -> None:
    """Send logs to stderr in ``fmt`` (text or json) at ``level``.

    ``process`` names this process among the server's (``worker 1``, ``supervisor``) in
    every line: ``[worker 1]`` in text, a ``worker`` field in JSON; None for a lone server.
    """
    global _configured
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt, process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _configured = _Configured(handler, fmt, process)


# --- Triton's log settings ----------------------------------------------------------------

#: Triton's log settings keys, in its order
LOG_SETTING_KEYS = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level",
                    "log_format")
LOG_FORMATS: tuple[str, ...] = typing.get_args(LogFormat)
#: each on/off key: the level it turns on, and the threshold that turns it off
_SWITCHES = {"log_error": (logging.ERROR, logging.CRITICAL),
             "log_warning": (logging.WARNING, logging.ERROR),
             "log_info": (logging.INFO, logging.WARNING)}

LogSettingValue = bool | int | str


def log_settings() -> dict[str, LogSettingValue]:
    """This process's log settings under Triton's keys.

    onnxserve logs by severity threshold (the root logger's level, ``--log-level``):
    ``log_info``, ``log_warning`` and ``log_error`` say whether that severity is logged;
    ``log_verbose_level`` is 1 at DEBUG, else 0; ``log_format`` is onnxserve's ``text`` or
    ``json`` (``--log-format``); ``log_file`` is always "" (standard error, as Triton
    reports its console).
    """
    level = logging.getLogger().getEffectiveLevel()
    return _view(level, _configured.format if _configured is not None else "text")


def _view(level: int, fmt: str) -> dict[str, LogSettingValue]:
    return {"log_file": "", "log_info": level <= logging.INFO,
            "log_warning": level <= logging.WARNING, "log_error": level <= logging.ERROR,
            "log_verbose_level": int(level <= logging.DEBUG), "log_format": fmt}


def _switch(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"log setting {key!r} must be a boolean, got {value!r}")
    return value


def update_log_settings(updates: Mapping[str, object]) -> dict[str, LogSettingValue]:
    """Apply ``updates`` (Triton's keys, a subset) to this process and return the settings
    now in force (as ``log_settings``). All or nothing: nothing changes when any key fails.

    Keys and values: ``log_info`` / ``log_warning`` / ``log_error`` booleans (turning one on
    turns on every more severe one, turning one off every less severe one: the level is a
    threshold; all three off leaves only CRITICAL); ``log_verbose_level`` an integer >= 0
    (any level above 0 is DEBUG, read back as 1; 0 leaves DEBUG for INFO); ``log_format``
    ``text`` or ``json``; ``log_file`` only "" (standard error: the container runtime, or
    the ``--workers`` supervisor, collects the lines; writing files is not offered).

    Only this process changes: with ``--workers N``, the worker whose connection carried the
    call; the other workers and the supervisor keep their settings.

    Raises:
        InvalidInputError: an unknown key, a value of the wrong type or out of range, or
            settings that contradict each other under a threshold (``log_info`` on with
            ``log_warning`` off).
    """
    unknown = sorted(set(updates) - set(LOG_SETTING_KEYS))
    if unknown:
        raise InvalidInputError(
            f"unknown log setting(s) {', '.join(map(repr, unknown))}; the log settings are "
            f"{', '.join(LOG_SETTING_KEYS)}")
    level = logging.getLogger().getEffectiveLevel()
    current = log_settings()
    fmt = str(current["log_format"])
    for key, (on, off) in _SWITCHES.items():  # the most severe first
        if key in updates:
            level = min(level, on) if _switch(key, updates[key]) else max(level, off)
    if "log_verbose_level" in updates:
        verbose = updates["log_verbose_level"]
        if isinstance(verbose, bool) or not isinstance(verbose, int) or verbose < 0:
            raise InvalidInputError(
                f"log setting 'log_verbose_level' must be an integer >= 0, got {verbose!r}")
        level = logging.DEBUG if verbose else max(level, logging.INFO)
    if "log_format" in updates:
        fmt_value = updates["log_format"]
        if fmt_value not in LOG_FORMATS:
            raise InvalidInputError(
                f"log setting 'log_format' must be one of {', '.join(LOG_FORMATS)}, got "
                f"{fmt_value!r}")
        fmt = str(fmt_value)
    if "log_file" in updates and updates["log_file"] != "":
        raise InvalidInputError(
            f"log setting 'log_file' can only be \"\" (standard error), got "
            f"{updates['log_file']!r}: onnxserve does not write log files; redirect its "
            "standard error instead")
    result = _view(level, fmt)
    for key in (*_SWITCHES, "log_verbose_level"):
        if key in updates and bool(result[key]) != bool(updates[key]):
            sent = ", ".join(f"{k}={updates[k]!r}" for k in (*_SWITCHES, "log_verbose_level")
                             if k in updates)
            raise InvalidInputError(
                f"log settings {sent} contradict each other: onnxserve logs by severity "
                "threshold (verbose < info < warning < error), so turning a severity on "
                "turns on every more severe one")
    logging.getLogger().setLevel(level)
    if fmt != current["log_format"]:
        if _configured is None:
            configure(logging.getLevelName(level), fmt)
        else:
            _configured.handler.setFormatter(_formatter(fmt, _configured.process))
            _configured.format = fmt
    return result


#: seconds a window of failed requests lasts before its summary is logged
FAILURE_WINDOW_S = 10.0
#: failures of one status logged one by one at INFO per window; the rest go to DEBUG and
#: into the window's summary (a full queue refuses thousands of requests a second)
FAILURES_LOGGED_PER_WINDOW = 5

Schedule = Callable[[float, Callable[[], None]], object]


@dataclass
class _FailureCount:
    failed: int = 0
    logged: int = 0
    example: str = ""


class FailureLog:
    """``request_failed`` events, summarised when they come in floods.

    Per window of ``window`` seconds (opened by the first failure), the first ``per_window``
    failures of each status are logged one by one at INFO, the rest at DEBUG; when the
    window ends, every (status, model) with failures not logged at INFO gets one
    ``requests_failed_summary`` event: ``failed`` in the window, ``logged`` of them one by
    one, and one ``example`` reason. INTERNAL failures (bugs) are always logged, at ERROR.
    Metrics count every failure either way.

    ``schedule(delay, callback)`` arranges the end of a window (``loop.call_later`` on the
    event loop); without it a window ends at the next failure after it, or at ``flush``.
    """

    def __init__(self, logger: logging.Logger, *, window: float = FAILURE_WINDOW_S,
                 per_window: int = FAILURES_LOGGED_PER_WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Schedule | None = None) -> None:
        self._log = logger
        self._window = window
        self._per_window = per_window
        self._clock = clock
        self._schedule = schedule
        self._started: float | None = None
        self._windows = 0  # windows opened so far: a scheduled end ends only its own
        self._by_status: dict[str, int] = {}
        self._counts: dict[tuple[str, str], _FailureCount] = {}

    def failed(self, *, status: str, model: str, version: str, request_id: str,
               reason: str) -> None:
        """Log one failed request (``status``: the canonical code the caller was given)."""
        fields = {"model": model, "version": version, "status": status,
                  "request_id": request_id, "reason": reason}
        if status == INTERNAL:
            event(self._log, logging.ERROR, "request_failed", **fields)
            return
        now = self._clock()
        if self._started is not None and now - self._started >= self._window:
            self.flush()
        if self._started is None:
            self._started = now
            self._windows += 1
            if self._schedule is not None:
                opened = self._windows
                self._schedule(self._window, lambda: self._end(opened))
        seen = self._by_status.get(status, 0) + 1
        self._by_status[status] = seen
        count = self._counts.setdefault((status, model), _FailureCount(example=reason))
        count.failed += 1
        if seen <= self._per_window:
            count.logged += 1
            event(self._log, logging.INFO, "request_failed", **fields)
        else:
            event(self._log, logging.DEBUG, "request_failed", **fields)

    def _end(self, window: int) -> None:
        if window == self._windows:
            self.flush()

    def flush(self) -> None:
        """End the current window: log its summaries (nothing when none is due)."""
        if self._started is None:
            return
        seconds = round(self._clock() - self._started, 1)
        counts, self._counts, self._by_status, self._started = self._counts, {}, {}, None
        for (status, model), count in counts.items():
            if count.failed > count.logged:
                event(self._log, logging.INFO, "requests_failed_summary", status=status,
                      model=model, failed=count.failed, logged=count.logged,
                      seconds=seconds, example=count.example[:300])
