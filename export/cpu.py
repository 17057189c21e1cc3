"""The CPU this process runs on, as far as onnxruntime's kernels and our figures care.

The int8 export reads its instruction sets (export/variants.py), and benchmark results
name it (timings differ 2x between CPU generations; benchmarks/ imports it from here, as
the serving side needs none of it): onnxruntime's x86 kernels multiply 8-bit integers with AVX2's
VPMADDUBSW (16-bit intermediate sums, which can saturate), with AVX-512 VNNI / AVX-VNNI's
VPDPBUSD (no saturation), and on AMX CPUs with tile instructions.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cpu:
    """A CPU: its model name, core count and the instruction sets named above."""

    name: str
    #: x86-64 (where onnxruntime's U8S8 kernels use VPMADDUBSW or, with VNNI, VPDPBUSD)
    x86: bool
    avx512: bool
    #: AVX-512 VNNI or AVX-VNNI: 8-bit dot products without 16-bit saturation
    vnni: bool
    #: Advanced Matrix Extensions (int8 and bf16 tiles)
    amx: bool = False
    cores: int = 1

    def features(self) -> list[str]:
        """The instruction sets above that the CPU has, by their usual names; on x86 the
        absent ones too ("no VNNI"), since results depend on them."""
        if not self.x86:
            return []
        return [name if present else f"no {name}" for name, present in
                (("AVX-512", self.avx512), ("VNNI", self.vnni), ("AMX", self.amx))]

    def __str__(self) -> str:
        features = ", ".join(self.features())
        described = f"{self.name}, {self.cores} cores"
        return f"{described} ({features})" if features else described


def parse_cpuinfo(cpuinfo: str, cores: int | None = None) -> Cpu:
    """The Cpu that ``cpuinfo`` (the text of Linux's /proc/cpuinfo) describes; fields it
    lacks come from the platform module (the features then count as absent)."""
    name = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    machine = platform.machine().lower()
    x86 = bool(flags & {"sse2", "avx2"}) or (not flags and machine in ("x86_64", "amd64"))
    return Cpu(
        name=name or platform.processor() or machine or "unknown CPU",
        cores=cores if cores is not None else (os.cpu_count() or 1),
        x86=x86,
        avx512="avx512f" in flags,
        vnni=bool(flags & {"avx512_vnni", "avx_vnni"}),
        amx=bool(flags & {"amx_tile", "amx_int8"}),
    )


@functools.cache
def this_cpu() -> Cpu:
    """This machine's CPU (read once)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return parse_cpuinfo(cpuinfo)
