"""How one onnxruntime session runs: threads, spinning, graph optimisation, GPU options.

Values only: the model's plan (serving/runtime/plan.py, serving/runtime/accelerators.py)
decides them from its config; the instance makes sessions from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SessionSettings:
    """Threads, spinning and graph optimisation of one onnxruntime session."""

    intra_op: int = 1
    inter_op: int = 1
    spinning: str = "run"
    #: run independent branches of the graph in parallel (inter_op threads)
    parallel: bool = False
    #: onnxruntime graph optimisation: "all", "extended", "basic" or "none"
    optimization: str = "all"


@dataclass(frozen=True)
class GpuSettings:
    """How GPU instances of one model run."""

    #: CUDA execution provider options (strings, as onnxruntime takes them)
    cuda: dict[str, str] = field(default_factory=dict)
    #: TensorRT execution provider options; None: TensorRT not asked for
    tensorrt: dict[str, str] | None = None
    #: bind inputs and outputs explicitly (None: on for GPU instances, off on the CPU)
    io_binding: bool | None = None
    #: batch sizes batches are padded up to; () none; None: decided by the device
    buckets: tuple[int, ...] | None = None
