"""A tracing profile of the whole server process, for benchmarks/profile.py.

With ``ONNXSERVE_PROFILE_OUT=PATH`` in its environment, the server runs under yappi (a
tracing profiler that follows every thread and asyncio's coroutines; ``pip install yappi``)
from the moment it is ready (so the warm-up measurements that choose how models run are not
slowed down by the profiler), and writes, when it stops: PATH (pstats format, every
function's calls, own and inclusive CPU time per thread) and PATH.threads.txt (CPU time per
thread). A development switch, not a setting: it slows every call down.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENVIRONMENT = "ONNXSERVE_PROFILE_OUT"
_active: Path | None = None


def start_from_environment() -> None:
    """Start yappi (CPU clock, every thread) when the environment asks for a profile."""
    global _active
    target = os.environ.get(ENVIRONMENT)
    if not target:
        return
    try:
        import yappi
    except ModuleNotFoundError:
        log.error("%s is set but yappi is not installed (pip install yappi): no profile",
                  ENVIRONMENT)
        return
    yappi.set_clock_type("cpu")
    yappi.start(builtins=False, profile_threads=True)
    _active = Path(target)
    log.warning("profiling the server with yappi into %s (every call is slower)", _active)


def write_profile() -> None:
    """Stop the profiler and write its results (nothing when none runs)."""
    global _active
    if _active is None:
        return
    import yappi

    yappi.stop()
    yappi.get_func_stats().save(str(_active), type="pstat")
    lines = [f"{t.name} (id {t.id}, tid {t.tid}): {t.ttot:.3f} s CPU"
             for t in sorted(yappi.get_thread_stats(), key=lambda t: -t.ttot)]
    Path(f"{_active}.threads.txt").write_text("\n".join(lines) + "\n")
    log.info("profile written to %s", _active)
    _active = None
