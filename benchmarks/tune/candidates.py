"""One configuration `onnxserve tune` measures: the knobs of a model's config.pbtxt and of
`onnxserve serve` that change its speed, read from a config and written back into one.

The config's knobs are Triton's fields and onnxruntime-backend parameters (``instance_group``
count, ``dynamic_batching`` with ``preferred_batch_size`` and ``max_queue_delay_microseconds``,
``intra_op_thread_count``) and onnxserve's own parameters (``onnxserve.spinning``,
``onnxserve.run_on_event_loop``, see serving/models/options.py). ``workers`` and
``grpc_transport`` are the server's flags (``--workers``, ``--grpc-transport``): they go into
the report's serve command, not the config.

``max_batch_size`` is never changed: it is the model's contract (the most samples a client may
send in one request). The batches the scheduler forms from many requests stop growing at the
largest preferred batch size (serving/batching/assembly.py), which is the knob tuned instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from onnxserve.protos.model_config_pb2 import ModelConfig, ModelInstanceGroup
from onnxserve.serving.models.options import INTRA_OP_KEY, SPINNING_KEY, model_options
from onnxserve.serving.runtime.plan import (
    ExecutionPlan,
    instance_count,
    plan_execution,
    should_run_on_event_loop,
)
from onnxserve.serving.types import RUN_ON_EVENT_LOOP_KEY

#: onnxserve's default spinning mode (serving/runtime/plan.py)
DEFAULT_SPINNING = "run"
#: the provider the warm-up's choice of the event loop is asked for (CPU sessions only)
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Candidate:
    """A configuration of one repository model (``model``: the model itself or one of its
    variants, ``variant`` naming its precision: fp32, fp16 or int8)."""

    model: str
    variant: str = "fp32"
    #: sessions (instance_group count)
    instances: int = 1
    #: onnxruntime intra-op threads per session (0: the server's share of the cores, and
    #: the warm-up may then move a small model's batches onto the event loop)
    intra_op_threads: int = 0
    #: dynamic batching on (off: every request runs alone)
    batching: bool = True
    #: the largest preferred batch size (0: none, batches grow to max_batch_size)
    preferred_batch_size: int = 0
    max_queue_delay_us: int = 0
    #: onnxserve.spinning (None: the server's default, ``run``)
    spinning: str | None = None
    #: onnxserve.run_on_event_loop (None: decided by the warm-up's measurement where the
    #: server chooses the threads of one instance, else worker threads)
    run_on_event_loop: bool | None = None
    #: server processes (onnxserve serve --workers)
    workers: int = 1
    #: onnxserve serve --grpc-transport (None: the server's own choice)
    grpc_transport: str | None = None

    @classmethod
    def from_config(cls, config: ModelConfig, variant: str = "fp32") -> Candidate:
        """The configuration ``config`` (a model's config.pbtxt) describes, served with one
        worker and the default transport: the baseline every other is compared with.

        Raises:
            ModelLoadError: a parameter the server would refuse (serving/models/options.py).
        """
        options = model_options(config)
        batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
        preferred = list(config.dynamic_batching.preferred_batch_size)
        return cls(
            model=config.name, variant=variant, instances=instance_count(config),
            intra_op_threads=options.intra_op_threads or 0, batching=batching,
            preferred_batch_size=max(preferred) if batching and preferred else 0,
            max_queue_delay_us=(config.dynamic_batching.max_queue_delay_microseconds
                                if batching else 0),
            spinning=options.spinning, run_on_event_loop=options.run_on_event_loop)

    def _plan(self, cores: int | None) -> ExecutionPlan:
        """The plan the server makes of this candidate's sessions in one of its workers
        (serving/runtime/plan.py, each worker with its share of ``cores``)."""
        cores = cores or os.cpu_count() or 1
        config = self.apply(ModelConfig(name=self.model, max_batch_size=1))
        return plan_execution(config, model_options(config),
                              cores=max(1, cores // self.workers))

    def threads(self, cores: int | None = None) -> int:
        """The intra-op threads each session runs with: the configured count, else each
        worker's share of the cores split between its instances."""
        return self._plan(cores).session.intra_op

    def effective(self, cores: int | None = None) -> Candidate:
        """The same configuration with the server's defaults spelled out as its execution
        plan resolves them (serving/runtime/plan.py): equal when they serve alike.

        Threads counted; spinning named; the event loop left to the warm-up (None) only
        where the warm-up could choose it (one instance whose threads the server chooses),
        else worker threads; no batching knobs when batching is off.
        """
        plan = self._plan(cores)
        inline = plan.run_on_event_loop
        if inline is None and not should_run_on_event_loop(plan, 0.0, 0.0, CPU_PROVIDER):
            inline = False
        out = replace(self, intra_op_threads=plan.session.intra_op,
                      spinning=plan.session.spinning, run_on_event_loop=inline)
        if not self.batching:
            out = replace(out, preferred_batch_size=0, max_queue_delay_us=0)
        return out

    def apply(self, config: ModelConfig) -> ModelConfig:
        """A copy of ``config`` (this model's config.pbtxt) with this candidate's knobs;
        its other fields (inputs, outputs, labels, other parameters) as they were.

        Raises:
            ValueError: the config is another model's, or asks for batching without a
                batch dimension (max_batch_size 0).
        """
        if config.name and config.name != self.model:
            raise ValueError(f"config of {config.name!r} given for a candidate of "
                             f"{self.model!r}")
        if self.batching and config.max_batch_size <= 0:
            raise ValueError(f"model {self.model!r}: dynamic batching needs max_batch_size > "
                             f"0, and its config has {config.max_batch_size}")
        out = ModelConfig()
        out.CopyFrom(config)
        out.name = self.model
        kind = (config.instance_group[0].kind if config.instance_group
                else ModelInstanceGroup.KIND_CPU)
        del out.instance_group[:]
        out.instance_group.add(count=self.instances, kind=kind)
        out.ClearField("dynamic_batching")
        if self.batching:
            # Triton's other scheduling fields (queue policy, priorities) stay as they were
            out.dynamic_batching.CopyFrom(config.dynamic_batching)
            del out.dynamic_batching.preferred_batch_size[:]
            if self.preferred_batch_size:
                out.dynamic_batching.preferred_batch_size.append(self.preferred_batch_size)
            out.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        _set(out, INTRA_OP_KEY, str(self.intra_op_threads) if self.intra_op_threads else None)
        _set(out, SPINNING_KEY, self.spinning)
        _set(out, RUN_ON_EVENT_LOOP_KEY, None if self.run_on_event_loop is None
             else str(self.run_on_event_loop).lower())
        return out

    def serve_flags(self) -> list[str]:
        """The `onnxserve serve` flags this candidate needs beyond its config (the report's
        serve command; the measured servers were also given ``--workers 1``)."""
        flags = ["--workers", str(self.workers)] if self.workers != 1 else []
        if self.grpc_transport is not None:
            flags += ["--grpc-transport", self.grpc_transport]
        return flags

    def describe(self, cores: int | None = None) -> str:
        """``mobilenet_v2_int8 (int8): 2 instances x 1 thread, batching preferred 4 ...``."""
        e = self.effective(cores)
        parts = [f"{e.instances} instance{'s' if e.instances > 1 else ''} x "
                 f"{e.intra_op_threads} thread{'s' if e.intra_op_threads > 1 else ''}"]
        if not e.batching:
            parts.append("no batching")
        else:
            parts.append("batching" + (f" to {e.preferred_batch_size}"
                                       if e.preferred_batch_size else ""))
            if e.max_queue_delay_us:
                parts.append(f"delay {e.max_queue_delay_us} us")
        if e.spinning != DEFAULT_SPINNING:
            parts.append(f"spinning {e.spinning}")
        if e.run_on_event_loop:
            parts.append("on the event loop")
        elif e.run_on_event_loop is False and e.instances == 1:
            parts.append("in worker threads")
        if e.workers != 1:
            parts.append(f"{e.workers} workers")
        if e.grpc_transport is not None:
            parts.append(f"{e.grpc_transport} gRPC")
        return f"{self.model} ({self.variant}): " + ", ".join(parts)


def _set(config: ModelConfig, key: str, value: str | None) -> None:
    if value is None:
        if key in config.parameters:
            del config.parameters[key]
    else:
        config.parameters[key].string_value = value
