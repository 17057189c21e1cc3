"""How a model's instances run: sessions, threads per session, spinning, and where runs happen.

The choice comes from, in order: the model's config.pbtxt ``parameters`` (Triton's
onnxruntime-backend keys ``intra_op_thread_count`` / ``inter_op_thread_count``, and
``onnxserve.spinning`` / ``onnxserve.run_on_event_loop``), then the server's flags, then
defaults chosen by measurement on a 2-core machine (the figures are in
benchmarks/results/defaults.md):

- one instance, one onnxruntime thread per core (instances split the cores between them);
- spinning only while a run is in progress (``run``): a pool that spins between operators
  shortens a run, and stopping the spin when the run ends leaves the cores to the event
  loop between batches (a pool that keeps spinning, ``always``, costs small models much of
  their throughput); when the instances' threads outnumber the cores, no pool spins (they
  would steal each other's cores);
- tiny models (a batch of 1 runs in under ``INLINE_LIMIT_S`` and the largest batch in under
  ``INLINE_STALL_LIMIT_S`` at warm-up) run on the event loop's thread: handing a 50
  microsecond run to a worker thread and back costs more than the run itself. They keep
  their pool threads, spinning only during runs. A request that finds nothing queued runs
  at once in its own handler (no worker round trip), unless its front end knows other
  requests are in progress (serving/contract.py's OTHERS_IN_PROGRESS: the native gRPC
  transport's calls taken and not answered, a stream's requests in flight): then it waits
  one event loop turn and runs in one batch with those that arrived with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from onnxserve.protos.model_config_pb2 import ModelConfig
from onnxserve.serving.errors import ModelLoadError
from onnxserve.serving.runtime.accelerators import gpu_settings
from onnxserve.serving.runtime.devices import CPU_DEVICE, Device
from onnxserve.serving.runtime.sessions import GpuSettings, SessionSettings
from onnxserve.serving.types import RUN_ON_EVENT_LOOP_KEY, ModelOptions

#: A model runs inline when its batch of 1 runs faster than this at warm-up...
INLINE_LIMIT_S = 0.25e-3
#: ...and its largest batch faster than this (the longest the event loop may stall).
INLINE_STALL_LIMIT_S = 5e-3

#: Triton's optimization.graph.level values (onnxruntime backend) and onnxruntime's levels
GRAPH_LEVELS = {0: "all", -1: "basic", 1: "extended", 2: "none"}


@dataclass(frozen=True)
class ExecutionPlan:
    """Instances and their devices, their threads, and whether batches run on the event loop."""

    devices: tuple[Device, ...]
    #: the sessions of CPU instances (GPU instances: see ``session_for``)
    session: SessionSettings
    #: True / False when configured; None lets the warm-up measurement decide
    run_on_event_loop: bool | None
    #: the model or the server fixed the thread count (the inline choice must keep it)
    threads_fixed: bool
    gpu: GpuSettings = field(default_factory=GpuSettings)

    @property
    def instances(self) -> int:
        return len(self.devices)

    @property
    def on_gpu(self) -> bool:
        return any(d.is_gpu for d in self.devices)

    def session_for(self, device: Device) -> SessionSettings:
        """A GPU instance's CPU side only launches kernels: one thread, no spinning."""
        if not device.is_gpu:
            return self.session
        threads = self.session.intra_op if self.threads_fixed else 1
        return replace(self.session, intra_op=threads, spinning="off")

    def describe(self) -> str:
        where = "on the event loop" if self.run_on_event_loop else "in worker threads"
        places: dict[str, int] = {}
        for device in self.devices:
            places[device.describe()] = places.get(device.describe(), 0) + 1
        placed = ", ".join(f"{n} on {d}" for d, n in places.items())
        return (f"{self.instances} instance(s) ({placed}), {self.session.intra_op} intra-op "
                f"thread(s) per CPU instance, spinning {self.session.spinning}, batches run "
                f"{where}")


def instance_count(config: ModelConfig) -> int:
    """Sessions per model version: the sum of the instance groups' counts (at least 1)."""
    return max(sum(max(group.count, 1) for group in config.instance_group), 1)


def plan_execution(
    config: ModelConfig,
    options: ModelOptions,
    *,
    server_intra_op_threads: int = 0,
    server_spinning: str | None = None,
    cores: int | None = None,
    devices: tuple[Device, ...] | None = None,
) -> ExecutionPlan:
    """The execution plan for one model from its config and options (parsed by
    serving/models/options.py), the server's settings and the instances' devices
    (serving/runtime/devices.py; all on the CPU when not given)."""
    cores = cores or os.cpu_count() or 1
    if devices is None:
        devices = (CPU_DEVICE,) * instance_count(config)
    instances = max(sum(1 for d in devices if not d.is_gpu), 1)
    model_threads = options.intra_op_threads
    intra = model_threads or server_intra_op_threads or max(1, cores // instances)
    inter = options.inter_op_threads or 1
    parallel = (options.parallel_execution if options.parallel_execution is not None
                else inter > 1)
    level = config.optimization.graph.level
    if level not in GRAPH_LEVELS:
        raise ModelLoadError(
            f"model {config.name!r}: optimization.graph.level must be -1 (basic), 1 "
            f"(extended), 2 (none) or unset (all), not {level}"
        )
    accelerators = config.optimization.execution_accelerators.cpu_execution_accelerator
    if accelerators:
        raise ModelLoadError(
            f"model {config.name!r}: cpu_execution_accelerator "
            f"{', '.join(repr(a.name) for a in accelerators)} is not available; onnxserve runs "
            "CPU models on onnxruntime's default CPU provider (remove the accelerator)"
        )
    spinning = options.spinning or server_spinning
    if spinning is None:
        spinning = "run" if instances * intra <= cores else "off"
    run_on_event_loop = options.run_on_event_loop
    if run_on_event_loop and (len(devices) > 1 or devices[0].is_gpu):
        raise ModelLoadError(
            f"model {config.name!r}: parameter {RUN_ON_EVENT_LOOP_KEY!r} is true but the "
            "instance groups "
            f"ask for {len(devices)} instance(s) on {devices[0].describe()}; the event loop "
            "runs one batch at a time on the CPU, so use count: 1 and kind: KIND_CPU"
        )
    fixed = bool(model_threads or server_intra_op_threads)
    settings = SessionSettings(intra, inter, spinning, parallel, GRAPH_LEVELS[level])
    return ExecutionPlan(tuple(devices), settings, run_on_event_loop, fixed,
                         gpu_settings(config, options))


def should_run_on_event_loop(
    plan: ExecutionPlan, batch_one_s: float | None, largest_batch_s: float | None, provider: str
) -> bool:
    """Whether an automatically planned model moves onto the event loop after its warm-up."""
    if plan.run_on_event_loop is not None:
        return plan.run_on_event_loop
    return (
        batch_one_s is not None
        and largest_batch_s is not None
        and batch_one_s < INLINE_LIMIT_S
        and largest_batch_s < INLINE_STALL_LIMIT_S
        and plan.instances == 1
        and not plan.threads_fixed
        and provider == "CPUExecutionProvider"
    )
