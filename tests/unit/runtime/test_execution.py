"""Execution plans (instances, threads, spinning, inline runs) and warm-up at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.onnx_models import add_one_model
from support.repositories import write_config

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.loader import load_model
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.repository import parse_config
from onnxserve.serving.models.warmup import default_samples, samples_from_config
from onnxserve.serving.runtime.devices import CPU_DEVICE
from onnxserve.serving.runtime.instance import session_options
from onnxserve.serving.runtime.plan import (
    ExecutionPlan,
    SessionSettings,
    plan_execution,
    should_run_on_event_loop,
)
from onnxserve.serving.settings import ServerSettings


def _plan(config, **kwargs) -> ExecutionPlan:
    """The plan of ``config`` with the options its parameters give."""
    return plan_execution(config, model_options(config), **kwargs)


def _config(text: str = ""):
    return parse_config('name: "m"\nmax_batch_size: 8\n' + text, "test")


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


def test_default_plan_gives_one_instance_every_core_and_spinning_during_runs() -> None:
    plan = _plan(_config(), cores=2)
    assert plan == ExecutionPlan((CPU_DEVICE,), SessionSettings(2, 1, "run"), None, False)


def test_instances_split_the_cores_and_oversubscribed_pools_do_not_spin() -> None:
    two = _config("instance_group { count: 2 kind: KIND_CPU }\n")
    assert _plan(two, cores=2).session == SessionSettings(1, 1, "run")
    crowded = _plan(two, cores=2, server_intra_op_threads=2)
    assert crowded.session.spinning == "off" and crowded.threads_fixed


def test_model_parameters_override_the_server() -> None:
    config = _config(_param("intra_op_thread_count", "3") + _param("onnxserve.spinning", "always")
                     + _param("inter_op_thread_count", "2"))
    plan = _plan(config, cores=2, server_intra_op_threads=1, server_spinning="off")
    assert plan.session == SessionSettings(3, 2, "always", parallel=True)


def test_graph_level_and_execution_mode_follow_triton() -> None:
    assert _plan(_config()).session.optimization == "all"
    for level, name in ((-1, "basic"), (1, "extended"), (2, "none")):
        config = _config(f"optimization {{ graph {{ level: {level} }} }}\n")
        assert _plan(config).session.optimization == name
        assert session_options(_plan(config).session).graph_optimization_level.name \
            == {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "none": "ORT_DISABLE_ALL"}[name]
    with pytest.raises(ModelLoadError, match=r"graph\.level"):
        _plan(_config("optimization { graph { level: 7 } }\n"))
    parallel = _plan(_config(_param("execution_mode", "1")))
    assert parallel.session.parallel
    assert session_options(parallel.session).execution_mode.name == "ORT_PARALLEL"
    with pytest.raises(ModelLoadError, match="openvino"):
        _plan(_config('optimization { execution_accelerators { '
                               'cpu_execution_accelerator { name: "openvino" } } }\n'))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("intra_op_thread_count", "many", "whole number"),
    ("onnxserve.spinning", "sometimes", "off, run, always"),
    ("onnxserve.run_on_event_loop", "maybe", "auto, true, false"),
])
def test_bad_parameter_values_name_the_parameter(key: str, value: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=f"{key}.*{message}"):
        _plan(_config(_param(key, value)))


def test_inline_on_request_keeps_the_threads_and_needs_one_instance() -> None:
    plan = _plan(_config(_param("onnxserve.run_on_event_loop", "true")), cores=4)
    assert plan.run_on_event_loop and plan.session == SessionSettings(4, 1, "run")
    with pytest.raises(ModelLoadError, match="count: 1"):
        _plan(_config(_param("onnxserve.run_on_event_loop", "true")
                               + "instance_group { count: 2 }\n"))


def test_only_fast_automatic_cpu_models_run_inline() -> None:
    auto = _plan(_config(), cores=2)
    cpu = "CPUExecutionProvider"
    assert should_run_on_event_loop(auto, 50e-6, 2e-3, cpu)
    assert not should_run_on_event_loop(auto, 1e-3, 2e-3, cpu)  # batch of 1 too slow
    assert not should_run_on_event_loop(auto, 50e-6, 20e-3, cpu)  # largest batch stalls the loop
    assert not should_run_on_event_loop(auto, 50e-6, 2e-3, "CUDAExecutionProvider")
    assert not should_run_on_event_loop(auto, None, None, cpu)  # not warmed up: unknown
    fixed = _plan(_config(), cores=2, server_intra_op_threads=2)
    assert not should_run_on_event_loop(fixed, 50e-6, 2e-3, cpu)
    refused = _plan(_config(_param("onnxserve.run_on_event_loop", "false")))
    assert not should_run_on_event_loop(refused, 50e-6, 2e-3, cpu)


@pytest.mark.parametrize(("mode", "allow", "stop"), [
    ("off", "0", None), ("run", "1", "1"), ("always", "1", None)])
def test_spinning_modes_reach_the_session_options(mode: str, allow: str, stop: str | None) -> None:
    options = session_options(SessionSettings(2, 1, mode))
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    if stop is None:
        with pytest.raises(Exception):  # noqa: B017 (onnxruntime raises a plain RuntimeError)
            options.get_session_config_entry("session.force_spinning_stop")
    else:
        assert options.get_session_config_entry("session.force_spinning_stop") == stop
    assert options.intra_op_num_threads == 2


def test_serve_flags_reach_the_plan(tmp_path: Path) -> None:
    from onnxserve.serving.cli import build_parser

    args = build_parser().parse_args(["serve", "--spinning", "always", "--cores", "3",
                                      "--no-warmup"])
    assert (args.spinning, args.cores, args.warmup) == ("always", 3, False)
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.spinning, defaults.cores, defaults.warmup) == (None, 0, True)
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    model = load_model(tmp_path, "m", ServerSettings(spinning="always", intra_op_threads=3))
    assert model.versions[1].instances[0].settings == SessionSettings(3, 1, "always")
    assert not model.plan.run_on_event_loop


def test_a_tiny_model_moves_onto_the_event_loop_after_warm_up(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    model = load_model(tmp_path, "m", ServerSettings(cores=2))
    version = model.versions[1]
    assert model.plan.run_on_event_loop and version.scheduler._inline
    assert version.instances[0].settings == SessionSettings(2, 1, "run")
    assert [r.batch_size for r in version.warmup] == [1, 32]
    assert "on the event loop" in model.parameters()["execution"]
    write_config(tmp_path / "m", _param("onnxserve.run_on_event_loop", "false"))
    kept = load_model(tmp_path, "m", ServerSettings(cores=2))
    assert not kept.plan.run_on_event_loop and kept.versions[1].instances[0].settings.intra_op == 2


def test_without_warm_up_nothing_runs_and_nothing_moves(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    model = load_model(tmp_path, "m", ServerSettings(warmup=False, cores=2))
    assert model.versions[1].warmup == [] and model.plan.run_on_event_loop is False


def test_default_warm_up_covers_one_the_preferred_sizes_and_the_largest() -> None:
    config = _config('input { name: "x" data_type: TYPE_UINT8 dims: [3] }\n'
                     "dynamic_batching { preferred_batch_size: [4, 16] }\n")
    samples = default_samples(config)
    assert [s.batch_size for s in samples] == [1, 4, 8]  # 16 exceeds max_batch_size
    assert samples[-1].inputs["x"].shape == (8, 3) and samples[-1].inputs["x"].dtype == np.uint8
    variable = _config('input { name: "x" data_type: TYPE_FP32 dims: [-1] }\n')
    assert default_samples(variable) == []


WARMUP_INPUT = 'input { name: "x" data_type: TYPE_FP32 dims: [4] }\n'


def _warmup(body: str) -> str:
    return f"model_warmup {{ {body} }}\n"


def test_model_warmup_entries_become_batches(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    np.arange(4, dtype="<f4").tofile(tmp_path / "warmup" / "x.bin")
    config = _config(WARMUP_INPUT + _warmup(
        'name: "file" batch_size: 3 count: 2 inputs { key: "x" value { data_type: TYPE_FP32 '
        'dims: [4] input_data_file: "x.bin" } }') + _warmup(
        'name: "noise" batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] '
        "random_data: true } }"))
    file_sample, noise = samples_from_config(config, tmp_path)
    assert (file_sample.batch_size, file_sample.count) == (3, 2)
    np.testing.assert_array_equal(file_sample.inputs["x"], np.tile(np.arange(4.0), (3, 1)))
    assert noise.inputs["x"].shape == (1, 4) and noise.count == 1


@pytest.mark.parametrize(("body", "message"), [
    ('batch_size: 9 inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] zero_data: true } }',
     "batch_size must be 1..8"),
    ('batch_size: 1 inputs { key: "y" value { data_type: TYPE_FP32 dims: [4] zero_data: true } }',
     "unknown input"),
    ('batch_size: 1 inputs { key: "x" value { data_type: TYPE_INT32 dims: [4] zero_data: true } }',
     "data_type TYPE_INT32 but the input is TYPE_FP32"),
    ('batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] '
     'input_data_file: "../config.pbtxt" } }', "points outside"),
    ('batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] '
     'input_data_file: "short.bin" } }', "needs 16 bytes"),
    ('batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 dims: [-1] zero_data: true } }',
     "fixed sizes"),
])
def test_bad_model_warmup_entries_are_load_errors(tmp_path: Path, body: str,
                                                  message: str) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "short.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match=message):
        samples_from_config(_config(WARMUP_INPUT + _warmup(body)), tmp_path)


def test_a_warm_up_the_model_cannot_run_fails_the_load(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", 'max_batch_size: 8\ninput { name: "x" data_type: TYPE_FP32 '
                 'dims: [4] }\n' + _warmup('name: "wrong" batch_size: 1 inputs { key: "x" value '
                                           '{ data_type: TYPE_FP32 dims: [5] zero_data: true } }'))
    with pytest.raises(ModelLoadError, match="dims \\[5\\] do not fit the input's dims \\[4\\]"):
        load_model(tmp_path, "m", ServerSettings())


def test_a_failing_warm_up_run_is_a_load_error_naming_the_sample() -> None:
    from onnxserve.serving.errors import InferenceFailedError
    from onnxserve.serving.models.warmup import WarmupSample, warm_up

    class Failing:
        def prepare(self, inputs):
            return inputs

        def run(self, inputs, output_names=None):
            raise InferenceFailedError("onnxruntime failed: out of memory")

    sample = WarmupSample("big", 8, {"x": np.zeros((8, 4), np.float32)}, 1)
    with pytest.raises(ModelLoadError, match="model 'm' version 1: warm-up 'big' failed: "
                                             "onnxruntime failed: out of memory"):
        warm_up([Failing()], [sample], "model 'm' version 1")
