"""Request tracing with OpenTelemetry, set as Triton sets its tracing.

Off by default (level ``OFF``). ``--trace-config`` takes Triton's settings (its
``src/command_line_parser.cc`` and docs/user_guide/trace.md): ``level=TIMESTAMPS`` turns it
on, ``rate=N`` traces one request in N (default 1000), ``count=N`` stops after N traces (-1:
no limit), ``mode=opentelemetry`` (the only mode: Triton's own file mode is not built), and
``opentelemetry,url=...`` (the OTLP/HTTP endpoint, default ``http://localhost:4318/v1/traces``),
``opentelemetry,resource=key=value``, ``opentelemetry,bsp_max_queue_size=...``,
``bsp_schedule_delay=...`` (ms), ``bsp_max_export_batch_size=...`` for the batch span
processor. A request that carries a W3C trace context (``traceparent``, from gRPC metadata or
HTTP headers) is always traced while the level is not OFF, and its spans join the caller's
trace, as Triton does.

At run time Triton's TraceSetting (gRPC) and ``/v2[/models/{m}]/trace/setting`` (HTTP) read
and change ``trace_level``, ``trace_rate`` and ``trace_count``, for all models or one
(``Tracing.update``: an empty value clears a setting: a model's falls back to the global one,
a global one to its start-up value).

Each traced request exports, with the times measured on its way (no span is open while it
runs): ``InferRequest`` (kind SERVER; the caller's span as parent), a child named after the
model (``triton.model_name``, ``triton.model_version``, ``triton.request_id``; events
REQUEST_START, QUEUE_START, REQUEST_END), and under it ``queue`` (its wait for a batch) and
``compute`` (the batch it ran in: ``onnxserve.batch_size`` samples from
``onnxserve.batch_requests`` requests, the model version; events COMPUTE_START,
COMPUTE_INPUT_END, COMPUTE_OUTPUT_START, COMPUTE_END). The OpenTelemetry SDK and its exporter
are imported and started only when tracing is first turned on.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from onnxserve.serving.errors import InvalidInputError, UnimplementedError
from onnxserve.serving.types import RequestTiming

log = logging.getLogger(__name__)

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
#: OTLP/HTTP's default endpoint, Triton's default url
DEFAULT_URL = "http://localhost:4318/v1/traces"
DEFAULT_RATE = 1000
UNLIMITED = -1
MAX_RATE = 2**32 - 1
#: the W3C trace context headers (gRPC metadata keys are lower case)
CONTEXT_KEYS = ("traceparent", "tracestate")
#: a W3C traceparent (version, trace id, parent id, flags); others are not followed
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
MODE = "opentelemetry"
#: what Triton's level words mean (case-insensitive)
_LEVEL_WORDS = {"off": "OFF", "false": "OFF", "timestamps": "TIMESTAMPS", "on": "TIMESTAMPS",
                "true": "TIMESTAMPS", "min": "TIMESTAMPS", "max": "TIMESTAMPS",
                "tensors": "TENSORS"}
_FILE_MODE = ("onnxserve exports traces with OpenTelemetry over OTLP/HTTP only "
              "(--trace-config opentelemetry,url=...); Triton's trace files are not built")


@dataclass(frozen=True)
class TraceSetting:
    """What is traced: ``level`` (OFF, or TIMESTAMPS and/or TENSORS: tensors are not
    exported, as in Triton's OpenTelemetry mode), one request in ``rate`` (0: only those
    that carry a trace context), at most ``count`` more traces (-1: no limit)."""

    level: tuple[str, ...] = ("OFF",)
    rate: int = DEFAULT_RATE
    count: int = UNLIMITED

    @property
    def on(self) -> bool:
        return self.level != ("OFF",)


@dataclass(frozen=True)
class TraceConfig:
    """The start-up settings (``--trace-config``)."""

    setting: TraceSetting = TraceSetting()
    url: str = DEFAULT_URL
    resource: Mapping[str, str] = field(default_factory=dict)
    bsp_max_queue_size: int = 2048
    bsp_schedule_delay_ms: int = 5000
    bsp_max_export_batch_size: int = 512

    def exporter_settings(self) -> dict[str, list[str]]:
        """The OpenTelemetry settings as TraceSetting reports them (Triton's keys)."""
        return {"url": [self.url],
                "resource": [f"{key}={value}" for key, value in self.resource.items()],
                "bsp_max_queue_size": [str(self.bsp_max_queue_size)],
                "bsp_schedule_delay": [str(self.bsp_schedule_delay_ms)],
                "bsp_max_export_batch_size": [str(self.bsp_max_export_batch_size)]}


def parse_levels(values: Sequence[str], what: str = "trace_level") -> tuple[str, ...]:
    """Trace level words (Triton's: OFF, TIMESTAMPS, TENSORS, and off/false, on/true/min/max
    for TIMESTAMPS, any case) as a tuple of LEVELS.

    Raises:
        ValueError: an unknown word, or OFF with another level.
    """
    levels: list[str] = []
    for value in values:
        level = _LEVEL_WORDS.get(value.strip().lower())
        if level is None:
            raise ValueError(f"{what}: expected OFF, TIMESTAMPS or TENSORS, not {value!r}")
        if level not in levels:
            levels.append(level)
    if "OFF" in levels and len(levels) > 1:
        raise ValueError(f"{what}: expect only one trace level 'OFF' is specified, not "
                         f"{', '.join(values)}")
    return tuple(levels) or ("OFF",)


def _integer(value: str, key: str, least: int, most: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"Unable to parse '{key}', got: {value}") from None
    if not least <= number <= most:
        raise ValueError(f"Unable to parse '{key}', value is out of range [ {least}, {most} ], "
                         f"got: {value}")
    return number


def parse_trace_config(entries: Sequence[str]) -> TraceConfig:
    """``--trace-config`` entries (``[mode,]setting=value``, Triton's syntax) as a TraceConfig.

    Raises:
        ValueError: an entry that is not ``[mode,]setting=value``, a setting or value
            onnxserve does not take, naming the entry.
    """
    config = TraceConfig()
    setting = config.setting
    levels: list[str] = []
    resource = dict(config.resource)
    exporter: dict[str, Any] = {}
    for entry in entries:
        mode, _, rest = entry.partition(",") if "," in entry.split("=", 1)[0] else (
            "", "", entry)
        key, equals, value = rest.partition("=")
        if not equals or not key:
            raise ValueError(f"--trace-config {entry!r}: expected [mode,]setting=value, as "
                             "level=TIMESTAMPS or opentelemetry,url=http://host:4318/v1/traces")
        try:
            if mode in ("", MODE) and key == "mode":
                if value != MODE:
                    raise ValueError(f"mode {value}: {_FILE_MODE}")
            elif mode == "" and key == "level":
                levels.extend(parse_levels([value], "level"))
            elif mode == "" and key == "rate":
                setting = replace(setting, rate=_integer(value, "rate", 0, MAX_RATE))
            elif mode == "" and key == "count":
                setting = replace(setting, count=_integer(value, "count", UNLIMITED, 2**31 - 1))
            elif mode == MODE and key == "url":
                exporter["url"] = value
            elif mode == MODE and key == "resource":
                name, has_value, text = value.partition("=")
                if not has_value or not name:
                    raise ValueError("resource: expected resource=key=value")
                resource[name] = text
            elif mode == MODE and key in ("bsp_max_queue_size", "bsp_max_export_batch_size"):
                exporter[key] = _integer(value, key, 1, 2**31 - 1)
            elif mode == MODE and key == "bsp_schedule_delay":
                exporter["bsp_schedule_delay_ms"] = _integer(value, key, 0, 2**31 - 1)
            elif mode == "triton" or (mode == "" and key in ("file", "log-frequency")):
                raise ValueError(_FILE_MODE)
            else:
                raise ValueError(
                    "unknown setting: onnxserve takes level, rate, count, mode=opentelemetry "
                    "and opentelemetry,url|resource|bsp_max_queue_size|bsp_schedule_delay|"
                    "bsp_max_export_batch_size")
        except ValueError as exc:
            raise ValueError(f"--trace-config {entry!r}: {exc}") from None
    if levels:
        try:
            setting = replace(setting, level=parse_levels(levels, "level"))
        except ValueError as exc:
            raise ValueError(f"--trace-config: {exc}") from None
    return replace(config, setting=setting, resource=resource, **exporter)


class _Sampler:
    """One setting in force and its sampling state: requests seen, and the traces left in
    ``budget`` (its own, or the global sampler's for a model that sets no count)."""

    __slots__ = ("budget", "left", "seen", "setting")

    def __init__(self, setting: TraceSetting, budget: _Sampler | None = None) -> None:
        self.setting = setting
        self.seen = 0
        self.left = setting.count
        self.budget = budget or self

    def sample(self, propagated: bool) -> bool:
        setting = self.setting
        if not setting.on:
            return False
        if propagated:  # as Triton: a caller's trace is followed whatever the rate and count
            return True
        budget = self.budget
        if not setting.rate or budget.left == 0:
            return False
        self.seen += 1
        if self.seen % setting.rate:
            return False
        if budget.left > 0:
            budget.left -= 1
        return True


@dataclass(slots=True)
class TracedRequest:
    """A request being traced: when it came (wall clock and perf_counter, ns), its
    caller's trace context, and the timing its batch fills in."""

    model: str
    context: dict[str, str] | None
    received_ns: int = field(default_factory=time.time_ns)
    received_perf_ns: int = field(default_factory=time.perf_counter_ns)
    timing: RequestTiming = field(default_factory=RequestTiming)

    def wall(self, perf_ns: int) -> int:
        """A time.perf_counter_ns() reading as wall-clock ns."""
        return self.received_ns + (perf_ns - self.received_perf_ns)


#: TraceSetting's keys that apply at run time
UPDATABLE = ("trace_level", "trace_rate", "trace_count")


class Tracing:
    """The trace settings in force (global, and per model), sampling, and the export of
    traced requests' spans. Sampling and updates run on the event loop's thread."""

    def __init__(self, config: TraceConfig) -> None:
        self.config = config
        self._started = config.setting  # what a cleared global setting returns to
        self._global = _Sampler(config.setting)
        #: model -> the settings it sets itself (the others follow the global ones)
        self._overrides: dict[str, dict[str, Any]] = {}
        self._models: dict[str, _Sampler] = {}
        #: whether any setting traces (checked per request: False costs one attribute read)
        self.active = config.setting.on
        self._tracer: Any = None
        self._provider: Any = None
        self._lock = threading.Lock()
        #: the exporter failed to start (logged once; nothing is traced)
        self._broken = False

    # --- settings ------------------------------------------------------------------------

    def _sampler(self, model: str) -> _Sampler:
        return self._models.get(model, self._global)

    def settings(self, model: str = "") -> dict[str, list[str]]:
        """The settings in force for ``model`` ("" for the global ones), as TraceSetting
        reports them: every key, each as a list of strings (``trace_count``: traces left)."""
        sampler = self._sampler(model) if model else self._global
        setting = sampler.setting
        return {"trace_level": list(setting.level), "trace_rate": [str(setting.rate)],
                "trace_count": [str(sampler.budget.left)], "trace_mode": [MODE],
                **self.config.exporter_settings()}

    def update(self, model: str, changes: Mapping[str, Sequence[str] | None]) -> None:
        """Apply TraceSetting's ``changes`` (key -> values; None or empty: clear) to
        ``model``'s settings ("" for the global ones).

        Raises:
            InvalidInputError: an unknown key or a value Triton would refuse (its wording).
            UnimplementedError: trace_file or log_frequency (Triton's file mode).
        """
        parsed: dict[str, Any] = {}
        cleared: list[str] = []
        for key, values in changes.items():
            values = list(values or ())
            if key in ("trace_file", "log_frequency"):
                raise UnimplementedError(f"{key}: {_FILE_MODE}")
            if key not in UPDATABLE:
                raise InvalidInputError(
                    f"unknown trace setting {key!r}: expected {', '.join(UPDATABLE)} "
                    "(the others are set at start with --trace-config)")
            if not values:
                cleared.append(key)
                continue
            try:
                if key == "trace_level":
                    parsed["level"] = parse_levels(values)
                    continue
                if len(values) != 1:
                    raise ValueError(f"expect only 1 value for '{key}'")
                if key == "trace_rate":
                    parsed["rate"] = _integer(values[0], key, 0, MAX_RATE)
                else:
                    try:
                        count = int(values[0].strip())
                    except ValueError:
                        raise ValueError(f"Unable to parse '{key}', got: {values[0]}") from None
                    if count < UNLIMITED:
                        raise ValueError(f"Unable to parse '{key}'. Expecting value >= -1, "
                                         f"got: {values[0]}")
                    parsed["count"] = count
            except ValueError as exc:
                raise InvalidInputError(str(exc)) from None
        cleared = [key.removeprefix("trace_") for key in cleared]  # TraceSetting's names
        if model:
            override = {**self._overrides.get(model, {}), **parsed}
            for name in cleared:
                override.pop(name, None)
            if override:
                self._overrides[model] = override
                self._models[model] = self._model_sampler(model, parsed.get("count"))
            else:
                self._overrides.pop(model, None)
                self._models.pop(model, None)
        else:
            before = self._global
            self._global = _Sampler(replace(
                before.setting, **parsed,
                **{name: getattr(self._started, name) for name in cleared}))
            self._global.seen = before.seen  # one in N goes on counting
            if "count" not in parsed and "count" not in cleared:
                self._global.left = before.left
            for name in self._overrides:  # their other settings follow the global ones
                self._models[name] = self._model_sampler(name, None)
        self.active = self._global.setting.on or any(
            sampler.setting.on for sampler in self._models.values())
        if self.active:
            self._start_exporter()

    def _model_sampler(self, model: str, new_count: int | None) -> _Sampler:
        """The sampler of a model's own settings over the global ones. A model that sets
        no count draws on the global traces left; one that does keeps its own left, unless
        its count was just set."""
        override = self._overrides[model]
        own_count = "count" in override
        sampler = _Sampler(replace(self._global.setting, **override),
                           None if own_count else self._global)
        before = self._models.get(model)
        if before is not None:
            sampler.seen = before.seen
            if own_count and new_count is None and before.budget is before:
                sampler.left = before.left
        return sampler

    # --- requests ------------------------------------------------------------------------

    def start(self, model: str, context: dict[str, str] | None) -> TracedRequest | None:
        """A request for ``model`` came, with the caller's trace context headers
        ``context`` (None: none): a TracedRequest when it is to be traced."""
        propagated = bool(context and _TRACEPARENT.match(context.get("traceparent", "")))
        if not self._sampler(model).sample(propagated):
            return None
        if not self._start_exporter():
            return None
        return TracedRequest(model, context if propagated else None)

    def finish(self, traced: TracedRequest, version: str, request_id: str, protocol: str,
               status: str, message: str = "") -> None:
        """Export the spans of a traced request answered with ``status`` (OK or the
        canonical error code, with ``message``) now."""
        tracer = self._tracer
        if tracer is None:
            return
        try:
            self._export(tracer, traced, version, request_id, protocol, status, message)
        except Exception as exc:  # tracing never fails a request
            log.warning("could not record a request's trace: %s", exc)

    def _export(self, tracer: Any, traced: TracedRequest, version: str, request_id: str,
                protocol: str, status: str, message: str) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        end = time.time_ns()
        parent = TraceContextTextMapPropagator().extract(traced.context or {})
        timing = traced.timing
        attributes: dict[str, Any] = {"triton.model_name": traced.model,
                                      "triton.request_id": request_id}
        if version:
            attributes["triton.model_version"] = int(version)
        root = tracer.start_span("InferRequest", context=parent, kind=trace.SpanKind.SERVER,
                                 start_time=traced.received_ns,
                                 attributes={**attributes, "onnxserve.protocol": protocol})
        inside = trace.set_span_in_context(root)
        model = tracer.start_span(traced.model, context=inside, kind=trace.SpanKind.SERVER,
                                  start_time=traced.received_ns, attributes=attributes)
        model.add_event("REQUEST_START", timestamp=traced.received_ns)
        if timing.enqueued_ns:
            queued = traced.wall(timing.enqueued_ns)
            model.add_event("QUEUE_START", timestamp=queued)
            in_model = trace.set_span_in_context(model)
            started = traced.wall(timing.compute_start_ns) if timing.compute_start_ns else end
            tracer.start_span("queue", context=in_model, start_time=queued).end(
                end_time=started)
            if timing.compute_end_ns:
                compute = tracer.start_span(
                    "compute", context=in_model, start_time=started,
                    attributes={"onnxserve.batch_size": timing.batch_size,
                                "onnxserve.batch_requests": timing.batch_requests,
                                "triton.model_version": int(version) if version else 0})
                for event, at in (("COMPUTE_START", timing.compute_start_ns),
                                  ("COMPUTE_INPUT_END", timing.input_end_ns),
                                  ("COMPUTE_OUTPUT_START", timing.output_start_ns),
                                  ("COMPUTE_END", timing.compute_end_ns)):
                    compute.add_event(event, timestamp=traced.wall(at))
                compute.end(end_time=traced.wall(timing.compute_end_ns))
        model.add_event("REQUEST_END", timestamp=end)
        for span in (model, root):
            if status != "OK":
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{status}: {message}"))
            span.end(end_time=end)

    # --- the exporter --------------------------------------------------------------------

    def _start_exporter(self) -> bool:
        """Start the OpenTelemetry tracer and its OTLP/HTTP exporter, once (the SDK is
        imported only when tracing is first on); False when it cannot start (logged once:
        tracing never fails a request)."""
        if self._tracer is not None:
            return True
        if self._broken:
            return False
        try:
            self._start_tracer()
        except Exception as exc:
            self._broken = True
            log.error("tracing: cannot start OpenTelemetry's exporter, no request is traced: "
                      "%s: %s", type(exc).__name__, exc)
            return False
        return True

    def _start_tracer(self) -> None:
        with self._lock:
            if self._tracer is not None:
                return
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            config = self.config
            provider = TracerProvider(resource=Resource.create(
                {"service.name": "onnxserve", **config.resource}))
            provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=config.url),
                max_queue_size=config.bsp_max_queue_size,
                schedule_delay_millis=config.bsp_schedule_delay_ms,
                max_export_batch_size=min(config.bsp_max_export_batch_size,
                                          config.bsp_max_queue_size)))
            self._provider = provider
            self._tracer = provider.get_tracer("onnxserve")
            log.info("tracing: OpenTelemetry spans to %s (OTLP/HTTP)", config.url)

    def close(self, timeout_s: float = 3.0) -> None:
        """Export the spans still queued and stop the exporter, waiting at most
        ``timeout_s`` (an unreachable receiver must not hold the process's exit: the
        exporter retries each batch for up to 10 s)."""
        provider, self._provider, self._tracer = self._provider, None, None
        self.active, self._broken = False, True  # a request from now on is not traced
        if provider is None:
            return
        stopping = threading.Thread(target=provider.shutdown, name="trace-export-stop",
                                    daemon=True)
        stopping.start()
        stopping.join(timeout_s)
        if stopping.is_alive():
            log.warning("tracing: spans still queued after %.0f s were not exported (is the "
                        "OTLP receiver at %s reachable?)", timeout_s, self.config.url)


def trace_context(pairs: Callable[[], Any]) -> dict[str, str] | None:
    """The W3C trace context among ``pairs()`` (gRPC metadata or HTTP headers as (key,
    value) pairs), None when it carries none."""
    found = {key.lower(): value for key, value in pairs() or ()
             if isinstance(value, str) and key.lower() in CONTEXT_KEYS}
    return found or None
