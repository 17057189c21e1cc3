"""Trace settings as Triton takes them: --trace-config parsing, sampling by rate and count,
the caller's context, and TraceSetting's updates (per model, cleared, refused)."""

from __future__ import annotations

import pytest

from onnxserve.serving.errors import InvalidInputError, UnimplementedError
from onnxserve.serving.observability.tracing import (
    DEFAULT_URL,
    TraceConfig,
    TraceSetting,
    Tracing,
    parse_trace_config,
    trace_context,
)


def test_trace_config_takes_tritons_settings() -> None:
    config = parse_trace_config([
        "level=TIMESTAMPS", "rate=10", "count=3", "mode=opentelemetry",
        "opentelemetry,url=http://127.0.0.1:9/v1/traces", "opentelemetry,resource=a=b=c",
        "opentelemetry,bsp_max_queue_size=64", "opentelemetry,bsp_schedule_delay=0",
        "opentelemetry,bsp_max_export_batch_size=8"])
    assert config.setting == TraceSetting(("TIMESTAMPS",), 10, 3)
    assert config.url == "http://127.0.0.1:9/v1/traces"
    assert dict(config.resource) == {"a": "b=c"}
    assert (config.bsp_max_queue_size, config.bsp_schedule_delay_ms,
            config.bsp_max_export_batch_size) == (64, 0, 8)
    assert parse_trace_config([]) == TraceConfig()
    assert parse_trace_config([]).url == DEFAULT_URL and not TraceConfig().setting.on
    assert parse_trace_config(["level=on", "level=tensors"]).setting.level == (
        "TIMESTAMPS", "TENSORS")
    assert parse_trace_config(["level=false"]).setting.level == ("OFF",)


@pytest.mark.parametrize(("entry", "said"), [
    ("level", "expected [mode,]setting=value"),
    ("level=loud", "expected OFF, TIMESTAMPS or TENSORS, not 'loud'"),
    ("rate=-1", "value is out of range [ 0, 4294967295 ], got: -1"),
    ("rate=often", "Unable to parse 'rate', got: often"),
    ("count=-2", "out of range [ -1,"),
    ("mode=triton", "Triton's trace files are not built"),
    ("triton,file=/tmp/trace.json", "Triton's trace files are not built"),
    ("file=/tmp/trace.json", "Triton's trace files are not built"),
    ("opentelemetry,resource=novalue", "expected resource=key=value"),
    ("opentelemetry,colour=blue", "unknown setting"),
    ("url=http://x", "unknown setting"),  # the url is the opentelemetry mode's
])
def test_trace_config_refuses_what_it_cannot_take(entry: str, said: str) -> None:
    with pytest.raises(ValueError, match="--trace-config") as refused:
        parse_trace_config([entry])
    assert said in str(refused.value) and repr(entry) in str(refused.value)


def _tracing(**setting) -> Tracing:
    tracing = Tracing(TraceConfig(setting=TraceSetting(**setting)))
    tracing._start_exporter = lambda: True  # type: ignore[method-assign]  # no export here
    return tracing


def _traced(tracing: Tracing, model: str, requests: int, context=None) -> int:
    return sum(tracing.start(model, context) is not None for _ in range(requests))


def test_one_in_rate_is_traced_until_the_count_runs_out() -> None:
    tracing = _tracing(level=("TIMESTAMPS",), rate=3, count=2)
    assert tracing.active
    assert _traced(tracing, "m", 5) == 1
    assert _traced(tracing, "m", 10) == 1  # the count ran out
    assert tracing.settings()["trace_count"] == ["0"]
    # the caller's context is always traced while the level is on
    assert _traced(tracing, "m", 2, {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) == 2
    assert _traced(_tracing(), "m", 2, {"traceparent": "x"}) == 0  # off
    assert _traced(_tracing(level=("TIMESTAMPS",), rate=0), "m", 50) == 0
    assert not _tracing().active


def test_updates_per_model_fall_back_to_the_global_settings() -> None:
    tracing = _tracing(rate=5)
    assert not tracing.active
    tracing.update("m", {"trace_level": ["TIMESTAMPS"], "trace_rate": ["1"]})
    assert tracing.active
    assert tracing.settings("m")["trace_level"] == ["TIMESTAMPS"]
    assert tracing.settings()["trace_level"] == ["OFF"]
    assert _traced(tracing, "m", 3) == 3 and _traced(tracing, "other", 3) == 0
    tracing.update("", {"trace_rate": ["2"]})  # m keeps its own rate
    assert tracing.settings("m")["trace_rate"] == ["1"]
    tracing.update("m", {"trace_rate": None})  # cleared: the global rate again
    assert tracing.settings("m")["trace_rate"] == ["2"]
    tracing.update("m", {"trace_level": []})  # nothing of its own left
    assert tracing.settings("m") == tracing.settings() and not tracing.active
    tracing.update("", {"trace_level": ["TIMESTAMPS"], "trace_count": ["1"]})
    tracing.update("", {"trace_level": None, "trace_count": None})  # the start-up values
    assert tracing.settings()["trace_level"] == ["OFF"]
    assert tracing.settings()["trace_count"] == ["-1"]
    assert tracing.settings()["trace_rate"] == ["2"]


@pytest.mark.parametrize(("changes", "error", "said"), [
    ({"trace_rate": ["1", "2"]}, InvalidInputError, "expect only 1 value for 'trace_rate'"),
    ({"trace_rate": ["x"]}, InvalidInputError, "Unable to parse 'trace_rate', got: x"),
    ({"trace_count": ["-5"]}, InvalidInputError,
     "Unable to parse 'trace_count'. Expecting value >= -1, got: -5"),
    ({"trace_level": ["OFF", "TENSORS"]}, InvalidInputError,
     "expect only one trace level 'OFF' is specified"),
    ({"trace_mode": ["triton"]}, InvalidInputError, "unknown trace setting 'trace_mode'"),
    ({"trace_file": ["t.json"]}, UnimplementedError, "trace_file: onnxserve exports"),
    ({"log_frequency": ["1"]}, UnimplementedError, "log_frequency"),
])
def test_updates_triton_refuses_are_refused(changes, error, said: str) -> None:
    tracing = _tracing()
    with pytest.raises(error) as refused:
        tracing.update("", changes)
    assert said in str(refused.value)
    assert tracing.settings()["trace_rate"] == ["1000"]  # nothing applied


def test_the_context_is_read_from_metadata_or_headers() -> None:
    assert trace_context(lambda: (("traceparent", "a"), ("x-other", "b"),
                                  ("tracestate", "c"))) == {"traceparent": "a",
                                                            "tracestate": "c"}
    assert trace_context(lambda: (("TraceParent", "a"),)) == {"traceparent": "a"}
    assert trace_context(lambda: (("grpc-bin", b"\0"),)) is None


def test_a_model_without_a_count_of_its_own_draws_on_the_global_one() -> None:
    tracing = _tracing(level=("TIMESTAMPS",), rate=1, count=2)
    tracing.update("m", {"trace_rate": ["1"]})  # its own rate, the global count
    assert _traced(tracing, "m", 5) + _traced(tracing, "other", 5) == 2
    assert tracing.settings("m")["trace_count"] == tracing.settings()["trace_count"] == ["0"]
    tracing.update("", {"trace_count": ["3"]})  # a new global count reaches the model too
    assert tracing.settings("m")["trace_count"] == ["3"]
    assert _traced(tracing, "m", 5) == 3
    tracing.update("m", {"trace_count": ["1"]})  # now its own
    tracing.update("", {"trace_count": ["5"]})
    assert tracing.settings("m")["trace_count"] == ["1"]
    assert _traced(tracing, "m", 5) == 1 and _traced(tracing, "other", 9) == 5
    tracing.update("m", {"trace_count": None})  # cleared: the global one again
    assert tracing.settings("m")["trace_count"] == tracing.settings()["trace_count"] == ["0"]


def test_a_global_change_keeps_counting_one_in_rate() -> None:
    tracing = _tracing(level=("TIMESTAMPS",), rate=4)
    assert _traced(tracing, "m", 3) == 0
    tracing.update("", {"trace_count": ["10"]})
    assert _traced(tracing, "m", 1) == 1  # the 4th request since the start


def test_only_a_well_formed_traceparent_is_followed() -> None:
    tracing = _tracing(level=("TIMESTAMPS",))  # rate 1000
    good = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "k=v"}
    traced = tracing.start("m", good)
    assert traced is not None and traced.context == good
    for bad in ("garbage", "00-" + "a" * 31 + "-" + "b" * 16 + "-01", ""):
        assert tracing.start("m", {"traceparent": bad}) is None


def test_an_exporter_that_cannot_start_traces_nothing_and_fails_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    tracing = Tracing(TraceConfig(setting=TraceSetting(("TIMESTAMPS",), 1, -1)))

    def broken() -> None:
        raise RuntimeError("no exporter here")

    tracing._start_tracer = broken  # type: ignore[method-assign]
    assert [tracing.start("m", None) for _ in range(3)] == [None, None, None]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no exporter here" in errors[0]
    tracing.close()
    assert not tracing.active
