"""Where model instances run: the GPUs this process can see, and each instance's device.

Triton's ``instance_group`` decides it: ``count`` sessions of ``kind`` KIND_CPU on the CPU,
KIND_GPU on each GPU listed in ``gpus`` (all visible GPUs when the list is empty), and
KIND_AUTO on the GPUs when CUDA is usable and the CPU otherwise. One onnxruntime session
drives one CUDA stream, so several sessions on a GPU overlap one batch's copies with
another's compute.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from onnxserve.protos.model_config_pb2 import ModelConfig, ModelInstanceGroup
from onnxserve.serving.errors import ModelLoadError


@dataclass(frozen=True)
class Device:
    """One instance's device: ``cpu``, or ``gpu`` with its CUDA device id."""

    kind: str = "cpu"
    id: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def describe(self) -> str:
        return f"GPU {self.id}" if self.is_gpu else "CPU"


CPU_DEVICE = Device()


@functools.cache
def _cuda_driver() -> ctypes.CDLL | None:
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        return driver if driver.cuInit(0) == 0 else None
    return None


@functools.cache
def cuda_device_count() -> int:
    """GPUs the CUDA driver shows this process (after CUDA_VISIBLE_DEVICES); 0 without one."""
    driver = _cuda_driver()
    count = ctypes.c_int(0)
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_device_name(device_id: int) -> str:
    """The GPU's name as the driver gives it (e.g. "NVIDIA H100 80GB HBM3"); "" if unknown."""
    driver = _cuda_driver()
    device = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if driver is None or driver.cuDeviceGet(ctypes.byref(device), device_id) != 0:
        return ""
    if driver.cuDeviceGetName(name, len(name), device) != 0:
        return ""
    return name.value.decode(errors="replace")


def _group_name(config: ModelConfig, index: int, group: ModelInstanceGroup) -> str:
    return f"model {config.name!r}: instance_group {group.name or index}"


def place_instances(config: ModelConfig, *, gpus_usable: int, mode: str,
                    why_not: str = "") -> tuple[Device, ...]:
    """The device of every instance of a model, in instance order.

    ``gpus_usable`` is how many GPUs CUDA can run on (0 when it cannot, ``why_not`` says
    why); ``mode`` is the server's ``--providers`` (auto, cpu, cuda).
    """
    groups = list(config.instance_group) or [ModelInstanceGroup()]
    gpu_ok = mode != "cpu" and gpus_usable > 0
    devices: list[Device] = []
    for index, group in enumerate(groups):
        where = _group_name(config, index, group)
        count = group.count if group.count > 0 else 1
        kind = group.kind
        if kind == ModelInstanceGroup.KIND_MODEL:
            raise ModelLoadError(f"{where}: KIND_MODEL is not supported; use KIND_CPU, "
                                 "KIND_GPU or KIND_AUTO")
        if kind == ModelInstanceGroup.KIND_CPU:
            if group.gpus:
                raise ModelLoadError(f"{where}: KIND_CPU takes no gpus list")
            devices += [CPU_DEVICE] * count
            continue
        if not gpu_ok:
            asked_by_group = kind == ModelInstanceGroup.KIND_GPU or bool(group.gpus)
            if asked_by_group or mode == "cuda":
                why = ("the server runs with --providers cpu" if mode == "cpu"
                       else f"CUDA is not usable here: {why_not or 'no GPU'}")
                who = (where if asked_by_group and config.instance_group
                       else f"model {config.name!r}: --providers cuda")
                raise ModelLoadError(f"{who} asks for GPU instances but {why}")
            devices += [CPU_DEVICE] * count
            continue
        ids = list(group.gpus) or list(range(gpus_usable))
        bad = [g for g in ids if not 0 <= g < gpus_usable]
        if bad:
            raise ModelLoadError(
                f"{where}: gpus {bad} do not exist; this machine has {gpus_usable} usable "
                f"GPU(s), ids 0 to {gpus_usable - 1}")
        devices += [Device("gpu", g) for g in ids for _ in range(count)]
    return tuple(devices)
