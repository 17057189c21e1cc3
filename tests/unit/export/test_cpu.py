"""The CPU description that benchmark results and the int8 export rely on."""

from __future__ import annotations

from onnxserve.export.cpu import parse_cpuinfo, this_cpu

_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16
"""
_OLD_X86 = """model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_features_are_read_from_the_flags() -> None:
    xeon = parse_cpuinfo(_XEON, cores=2)
    assert (xeon.name, xeon.cores) == ("Intel(R) Xeon(R) Platinum 8488C", 2)
    assert xeon.x86 and xeon.avx512 and xeon.vnni and xeon.amx
    assert str(xeon) == "Intel(R) Xeon(R) Platinum 8488C, 2 cores (AVX-512, VNNI, AMX)"


def test_absent_features_are_named_on_x86() -> None:
    old = parse_cpuinfo(_OLD_X86, cores=4)
    assert not (old.avx512 or old.vnni or old.amx)
    assert str(old).endswith("4 cores (no AVX-512, no VNNI, no AMX)")


def test_avx_vnni_counts_as_vnni() -> None:
    assert parse_cpuinfo("flags\t: sse2 avx2 avx_vnni\n", cores=1).vnni


def test_this_machine_is_described() -> None:
    cpu = this_cpu()
    assert cpu.name and cpu.cores >= 1
