"""The GPU path: instance placement, GPU options, I/O binding, top-k where the batch runs,
bucket padding and warm shapes. Everything runs here on onnxruntime's CPU provider (I/O
binding and the top-k graph work there too); the tests that need a usable CUDA device are
skipped with the reason when there is none."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from support.onnx_models import add_one_model, save_model
from support.repositories import write_config

from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.models.loader import load_model, warmup_sizes
from onnxserve.serving.models.options import model_options
from onnxserve.serving.models.repository import parse_config
from onnxserve.serving.models.warmup import default_samples
from onnxserve.serving.runtime.accelerators import gpu_settings, resolve_buckets
from onnxserve.serving.runtime.devices import CPU_DEVICE, Device, place_instances
from onnxserve.serving.runtime.instance import SessionInstance
from onnxserve.serving.runtime.pinned import host_buffer
from onnxserve.serving.runtime.plan import plan_execution
from onnxserve.serving.runtime.providers import (
    CPU,
    CUDA,
    TENSORRT,
    check_active,
    provider_chain,
    usable_gpus,
)
from onnxserve.serving.runtime.sessions import GpuSettings
from onnxserve.serving.runtime.topk import best_k
from onnxserve.serving.settings import ServerSettings

GPUS, WHY_NO_GPU = usable_gpus()
needs_gpu = pytest.mark.skipif(GPUS == 0, reason=f"no usable CUDA device: {WHY_NO_GPU}")


def _plan(config, **kwargs):
    """The plan of ``config`` with the options its parameters give."""
    return plan_execution(config, model_options(config), **kwargs)


def _gpu(config):
    """The GPU settings of ``config`` with the options its parameters give."""
    return gpu_settings(config, model_options(config))


def _config(text: str = "", batch: int = 8):
    return parse_config(f'name: "m"\nmax_batch_size: {batch}\n' + text, "test")


def _param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


GPU0, GPU1 = Device("gpu", 0), Device("gpu", 1)


# --- placement ------------------------------------------------------------------------

def test_instances_are_placed_as_the_instance_groups_say() -> None:
    place = place_instances
    assert place(_config(), gpus_usable=0, mode="auto") == (CPU_DEVICE,)
    assert place(_config(), gpus_usable=2, mode="auto") == (GPU0, GPU1)
    assert place(_config(), gpus_usable=2, mode="cpu") == (CPU_DEVICE,)
    gpu_group = _config("instance_group { count: 2 kind: KIND_GPU gpus: [1] }\n")
    assert place(gpu_group, gpus_usable=2, mode="cuda") == (GPU1, GPU1)
    every_gpu = _config("instance_group { count: 2 kind: KIND_GPU }\n")
    assert place(every_gpu, gpus_usable=2, mode="auto") == (GPU0, GPU0, GPU1, GPU1)
    mixed = _config("instance_group { count: 1 kind: KIND_GPU gpus: [0] }\n"
                    "instance_group { count: 3 kind: KIND_CPU }\n")
    assert place(mixed, gpus_usable=1, mode="auto") == (GPU0, CPU_DEVICE, CPU_DEVICE,
                                                          CPU_DEVICE)
    assert place(_config("instance_group { count: 3 }\n"), gpus_usable=0,
                 mode="auto") == (CPU_DEVICE,) * 3


@pytest.mark.parametrize(("text", "gpus", "mode", "message"), [
    ("instance_group { kind: KIND_GPU }", 0, "auto",
     "instance_group 0 asks for GPU instances but CUDA is not usable here: no CUDA"),
    ("instance_group { name: \"g\" kind: KIND_GPU }", 1, "cpu",
     "instance_group g asks for GPU instances but the server runs with --providers cpu"),
    ("instance_group { kind: KIND_AUTO }", 0, "cuda",
     "--providers cuda asks for GPU instances but CUDA is not usable here"),
    # no instance_group at all: the flag asked, not a group the config does not have
    ("", 0, "cuda", "^model 'm': --providers cuda asks for GPU instances but CUDA is not "
                    "usable here: no CUDA provider$"),
    ("instance_group { kind: KIND_GPU gpus: [0, 3] }", 2, "auto",
     r"gpus \[3\] do not exist; this machine has 2 usable GPU\(s\), ids 0 to 1"),
    ("instance_group { kind: KIND_MODEL }", 1, "auto", "KIND_MODEL is not supported"),
    ("instance_group { kind: KIND_CPU gpus: [0] }", 1, "auto", "KIND_CPU takes no gpus"),
])
def test_impossible_placements_are_load_errors(text: str, gpus: int, mode: str,
                                               message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        place_instances(_config(text + "\n"), gpus_usable=gpus, mode=mode,
                        why_not="no CUDA provider")


def test_plans_give_cpu_cores_to_cpu_instances_and_one_thread_to_gpu_instances() -> None:
    config = _config("instance_group { count: 1 kind: KIND_GPU }\n"
                     "instance_group { count: 2 kind: KIND_CPU }\n")
    plan = _plan(config, cores=8, devices=(GPU0, CPU_DEVICE, CPU_DEVICE))
    assert plan.instances == 3 and plan.on_gpu
    assert plan.session_for(CPU_DEVICE).intra_op == 4  # 8 cores, 2 CPU instances
    gpu_session = plan.session_for(GPU0)
    assert gpu_session.intra_op == 1 and gpu_session.spinning == "off"
    assert "1 on GPU 0, 2 on CPU" in plan.describe()
    with pytest.raises(ModelLoadError, match="kind: KIND_CPU"):
        _plan(_config(_param("onnxserve.run_on_event_loop", "true")), devices=(GPU0,))


# --- GPU options ----------------------------------------------------------------------

def test_gpu_options_come_from_the_accelerators_and_the_older_parameters() -> None:
    config = _config(
        _param("cudnn_conv_algo_search", "1") + _param("gpu_mem_limit", "1073741824")
        + _param("arena_extend_strategy", "1")
        + 'optimization { execution_accelerators { gpu_execution_accelerator: [ {\n'
          '  name: "cuda" parameters { key: "prefer_nhwc" value: "1" }\n'
          '  parameters { key: "cudnn_conv_algo_search" value: "DEFAULT" } },\n'
          '  { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" }\n'
          '    parameters { key: "max_workspace_size_bytes" value: "2147483648" } } ] } }\n')
    settings = _gpu(config)
    assert settings.cuda == {"cudnn_conv_algo_search": "DEFAULT", "gpu_mem_limit": "1073741824",
                             "arena_extend_strategy": "kSameAsRequested", "prefer_nhwc": "1"}
    trt = settings.tensorrt
    assert trt is not None and trt["trt_fp16_enable"] == "1"
    assert trt["trt_max_workspace_size"] == "2147483648"
    assert trt["trt_engine_cache_enable"] == "1"
    assert trt["trt_engine_cache_path"].endswith("onnxserve/tensorrt/m")
    assert settings.io_binding is None and settings.buckets is None
    assert _gpu(_config()) == GpuSettings()


@pytest.mark.parametrize(("text", "message"), [
    (_param("cudnn_conv_algo_search", "7"), "'cudnn_conv_algo_search' must be EXHAUSTIVE"),
    (_param("gpu_mem_limit", "lots"), "'gpu_mem_limit' must be a number of bytes"),
    (_param("arena_extend_strategy", "2"), "'arena_extend_strategy' must be kNextPowerOfTwo"),
    ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "cuda" '
     'parameters { key: "device_id" value: "1" } } ] } }', "unknown option 'device_id'"),
    ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: '
     '"tensorrt" parameters { key: "precision_mode" value: "FP8" } } ] } }',
     "precision_mode must be FP32, FP16 or INT8"),
    ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: '
     '"tensorrt" parameters { key: "colour" value: "1" } } ] } }',
     "unknown TensorRT parameter 'colour'"),
    ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: '
     '"openvino" } ] } }', "'openvino' is not available; expected cuda or tensorrt"),
    ("optimization { cuda { graphs: true } }", "optimization.cuda.graphs is not supported"),
    (_param("onnxserve.io_binding", "sometimes"), "must be one of auto, true, false"),
    (_param("onnxserve.batch_buckets", "4,x"), "batch sizes >= 1 separated by commas"),
    (_param("onnxserve.batch_buckets", "0,4"), "batch sizes >= 1"),
])
def test_bad_gpu_options_are_load_errors_naming_the_option(text: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        _gpu(_config(text + "\n"))


def test_bucket_sizes() -> None:
    assert resolve_buckets(None, 64, on_gpu=True) == (1, 2, 4, 8, 16, 32, 64)
    assert resolve_buckets(None, 24, on_gpu=True) == (1, 2, 4, 8, 16, 24)
    assert resolve_buckets(None, 64, on_gpu=False) == ()
    assert resolve_buckets((), 64, on_gpu=True) == ()
    assert resolve_buckets((4, 16, 128), 32, on_gpu=False) == (4, 16, 32)
    assert resolve_buckets(None, 0, on_gpu=True) == ()
    assert _gpu(_config(_param("onnxserve.batch_buckets", "16, 4"))).buckets == (4, 16)
    assert _gpu(_config(_param("onnxserve.batch_buckets", "none"))).buckets == ()


def test_warm_up_covers_every_shape_a_gpu_can_be_given() -> None:
    config = _config(batch=6)
    config.input.add(name="x", data_type=11, dims=[4])
    assert warmup_sizes(config, (1, 2, 4, 6), on_gpu=True) == [1, 2, 4, 6]
    assert warmup_sizes(config, (), on_gpu=True) == [1, 2, 3, 4, 5, 6]
    assert warmup_sizes(config, (), on_gpu=False) is None
    sizes = [s.batch_size for s in default_samples(config, [1, 2, 4, 6])]
    assert sizes == [1, 2, 4, 6]
    assert [s.batch_size for s in default_samples(config)] == [1, 6]


# --- providers ------------------------------------------------------------------------

def test_provider_chains_put_the_instance_on_its_device(caplog) -> None:
    assert provider_chain(CPU_DEVICE, GpuSettings(), [CUDA, CPU]) == [(CPU, {})]
    options = GpuSettings(cuda={"cudnn_conv_algo_search": "HEURISTIC"})
    assert provider_chain(GPU1, options, [CUDA, CPU]) == [
        (CUDA, {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}), (CPU, {})]
    trt = GpuSettings(tensorrt={"trt_fp16_enable": "1"})
    chain = provider_chain(GPU0, trt, [TENSORRT, CUDA, CPU])
    assert chain[0] == (TENSORRT, {"device_id": "0", "trt_fp16_enable": "1"})
    assert [name for name, _ in chain] == [TENSORRT, CUDA, CPU]
    with caplog.at_level(logging.WARNING):
        assert [n for n, _ in provider_chain(GPU0, trt, [CUDA, CPU])] == [CUDA, CPU]
    assert "no TensorRT execution provider" in caplog.text
    with pytest.raises(ModelLoadError, match="needs onnxruntime's CUDA execution provider"):
        provider_chain(GPU0, GpuSettings(), [CPU])


def test_a_tensorrt_provider_that_did_not_start_is_said(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert check_active("auto", [TENSORRT, CUDA, CPU], [CUDA, CPU], "m") == CUDA
    assert "TensorRT execution provider did not start" in caplog.text
    assert check_active("cuda", [TENSORRT, CUDA, CPU], [TENSORRT, CUDA, CPU], "m") == TENSORRT


def test_cuda_mode_fails_the_load_with_the_reason(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    if GPUS:
        model = load_model(tmp_path, "m", ServerSettings(providers="cuda"))
        assert model.provider == CUDA
        return
    with pytest.raises(ModelLoadError, match=f"CUDA is not usable here: {WHY_NO_GPU[:30]}"):
        load_model(tmp_path, "m", ServerSettings(providers="cuda"))
    assert load_model(tmp_path, "m", ServerSettings(providers="auto")).provider == CPU


# --- I/O binding and top-k where the batch runs -----------------------------------------

def _binding_instance(path: Path, device: Device = CPU_DEVICE) -> SessionInstance:
    return SessionInstance(path, model_name="m", device=device, gpu=GpuSettings(io_binding=True))


def test_io_binding_gives_the_same_outputs_and_only_those_asked_for(tmp_path: Path) -> None:
    path = add_one_model(tmp_path / "m.onnx")
    bound, plain = _binding_instance(path), SessionInstance(path, model_name="m")
    assert bound.io_binding and not plain.io_binding
    assert "I/O binding" in bound.describe()
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    out = bound.run({"x": x}, ["z"])
    assert list(out) == ["z"]
    np.testing.assert_array_equal(out["z"], plain.run({"x": x}, ["z"])["z"])
    np.testing.assert_array_equal(bound.run({"x": x})["y"], x + 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_top_k_runs_on_the_model_device_and_matches_numpy(tmp_path: Path, dtype) -> None:
    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    x = helper.make_tensor_value_info("x", element, ["batch", 50])
    y = helper.make_tensor_value_info("y", element, ["batch", 50])
    path = save_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                                        [x], [y]), tmp_path / "m.onnx")
    instance = _binding_instance(path)
    scores = np.random.default_rng(1).permutation(50 * 3).reshape(3, 50).astype(dtype)
    outputs, best = instance.run_with_top_k({"x": scores}, [], {"y": 5})
    assert outputs == {}
    expected = best_k(scores, 5)
    np.testing.assert_array_equal(best["y"].indices, expected.indices)
    np.testing.assert_array_equal(best["y"].values, expected.values)
    assert best["y"].values.dtype == dtype
    element_names = {np.float32: "tensor(float)", np.float16: "tensor(float16)",
                     np.float64: "tensor(double)"}
    assert set(instance._topk) == {element_names[dtype]}  # the top-k graph ran
    # k larger than the classes gives all of them, best first
    _, every = instance.run_with_top_k({"x": scores}, ["y"], {"y": 80})
    assert every["y"].indices.shape == (3, 50)


def test_top_k_of_outputs_that_are_not_two_dimensional_is_found_on_the_host(
        tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3])
    path = save_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                                        [x], [y]), tmp_path / "m.onnx")
    instance = _binding_instance(path)
    scores = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    _, best = instance.run_with_top_k({"x": scores}, [], {"y": 2})
    assert best["y"].indices.tolist() == [[5, 4], [5, 4]] and not instance._topk


def test_host_buffers_fall_back_to_pageable_memory_without_cuda() -> None:
    buffer = host_buffer((4, 3), np.dtype(np.float32), pinned=True)
    assert buffer.shape == (4, 3) and buffer.dtype == np.float32


# --- on a real GPU ----------------------------------------------------------------------

@needs_gpu
def test_a_gpu_instance_runs_on_cuda_with_pinned_buffers_and_matches_the_cpu(
        tmp_path: Path) -> None:
    from onnxserve.serving.runtime.pinned import pinned_empty

    path = add_one_model(tmp_path / "m.onnx", size=64)
    gpu = SessionInstance(path, model_name="m", providers="cuda", device=GPU0)
    cpu = SessionInstance(path, model_name="m", providers="cpu")
    assert gpu.provider == CUDA and gpu.io_binding
    assert pinned_empty((8, 64), np.dtype(np.float32)) is not None
    buffer = gpu.host_buffer((8, 64), np.dtype(np.float32))
    buffer[:] = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    np.testing.assert_allclose(gpu.run({"x": buffer})["z"], cpu.run({"x": buffer})["z"],
                               rtol=1e-6)
    _, best = gpu.run_with_top_k({"x": buffer}, [], {"y": 3})
    np.testing.assert_array_equal(best["y"].indices, best_k(buffer + 1, 3).indices)


@needs_gpu
def test_a_gpu_model_is_warmed_at_every_bucket(tmp_path: Path) -> None:
    add_one_model(tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", "max_batch_size: 16\ndynamic_batching {}\n")
    model = load_model(tmp_path, "m", ServerSettings(providers="cuda"))
    version = model.versions[1]
    assert version.scheduler.buckets == (1, 2, 4, 8, 16)
    assert sorted(r.batch_size for r in version.warmup) == [1, 2, 4, 8, 16]


def test_the_committed_kernels_are_what_the_generator_writes() -> None:
    from onnxserve.serving.runtime.kernels.generate import FOLDER, expected_files

    files = expected_files()
    assert sorted(files) == ["topk_float16.onnx", "topk_float32.onnx", "topk_float64.onnx"]
    for name, data in files.items():
        assert (FOLDER / name).read_bytes() == data, f"{name} is stale: run the generator"


def test_an_installed_but_unusable_cuda_provider_is_announced_loudly(monkeypatch,
                                                                     caplog) -> None:
    from onnxserve.serving.runtime import providers

    monkeypatch.setattr(providers, "usable_gpus", lambda: (0, "libcudnn.so.9 is missing"))
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    with caplog.at_level(logging.WARNING):
        assert providers.announce("auto") == (0, "libcudnn.so.9 is missing")
    assert ("CUDA execution provider is installed but not usable: libcudnn.so.9 is missing; "
            "--providers auto runs models on the CPU") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        providers.announce("cuda")
    assert "--providers cuda fails every GPU model" in caplog.text


class _FakeCudaRuntime:
    """Stands in for libcudart: records registrations, fails with ``status`` when set."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:
        self.registered.append((pointer, size, flags))
        return self.status

    def cudaHostUnregister(self, pointer: int) -> int:
        self.unregistered.append(pointer)
        return 0


def test_pinned_buffers_are_registered_and_unregistered_with_the_cuda_runtime(
        monkeypatch, caplog) -> None:
    import gc

    from onnxserve.serving.runtime import pinned

    runtime = _FakeCudaRuntime()
    monkeypatch.setattr(pinned, "_cuda_runtime", lambda: runtime)
    array = pinned.host_buffer((16, 3), np.dtype(np.float32), pinned=True)
    pointer = array.ctypes.data
    assert pointer % pinned.PAGE == 0 and array.shape == (16, 3) and array.dtype == np.float32
    assert runtime.registered == [(pointer, pinned.PAGE, 1)]  # whole pages
    array[:] = 1.5
    assert float(array.sum()) == 1.5 * 48
    big = pinned.host_buffer((3, 5000), np.dtype(np.float16), pinned=True)
    assert runtime.registered[-1][1] == 8 * pinned.PAGE and big.shape == (3, 5000)  # 30000 B
    del big
    gc.collect()
    runtime.unregistered.clear()
    view = array[:4]
    del array
    gc.collect()
    assert runtime.unregistered == []  # a view keeps the buffer (and its pinning) alive
    del view
    gc.collect()
    assert runtime.unregistered == [pointer]
    assert pinned.host_buffer((2, 2), np.dtype(np.uint8), pinned=False).shape == (2, 2)
    assert len(runtime.registered) == 2  # not pinned when not asked
    failing = _FakeCudaRuntime(status=2)
    monkeypatch.setattr(pinned, "_cuda_runtime", lambda: failing)
    with caplog.at_level(logging.WARNING):
        fallback = pinned.host_buffer((8,), np.dtype(np.float32), pinned=True)
    assert fallback.shape == (8,) and "stays pageable" in caplog.text


def test_string_outputs_come_back_through_io_binding(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["batch", 2])
    cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)
    instance = _binding_instance(save_model(helper.make_graph([cast], "cast", [x], [y]),
                                            tmp_path / "m.onnx"))
    assert instance._host_outputs == {"y"}
    out = instance.run({"x": np.array([[1.5, 2.0]], np.float32)})
    assert out["y"].tolist() == [["1.5", "2"]]


def test_a_gpu_session_on_another_device_than_its_instance_is_refused() -> None:
    from onnxserve.serving.runtime.instance import _check_device

    class Session:
        def get_provider_options(self):
            return {CUDA: {"device_id": "0"}}

    _check_device(Session(), CUDA, GPU0, "m")
    _check_device(Session(), CPU, GPU1, "m")  # a CPU fallback is check_active's to judge
    with pytest.raises(ModelLoadError, match="the instance for GPU 1 started on device '0'"):
        _check_device(Session(), CUDA, GPU1, "m")


def test_a_model_with_string_outputs_loads_with_io_binding(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["batch", 2])
    cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)
    save_model(helper.make_graph([cast], "cast", [x], [y]), tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", "max_batch_size: 4\n" + _param("onnxserve.io_binding", "true"))
    model = load_model(tmp_path, "m", ServerSettings())  # warm-up ranks no string output
    assert model.versions[1].instances[0].io_binding
