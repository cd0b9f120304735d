"""What this machine's CPU computes exactly: the facts a precision's defaults depend on.

ONNX Runtime multiplies int8 MatMuls as uint8 activations x int8 weights. On x86 without VNNI (AVX2, AVX-512
without VNNI) MLAS uses ``vpmaddubsw``, which adds two u8 x s8 products into a *saturating* int16: 8-bit
weights can overflow it (255 x 127 x 2 > 32767), so int8 artifacts for those CPUs keep 7-bit weights
(ONNX Runtime's ``reduce_range``). VNNI (``vpdpbusd``), AMX and ARM's dot-product instructions accumulate in
int32 and lose nothing, so there the eighth bit is free accuracy (real all-MiniLM-L6-v2, int8-dynamic
per-token + SmoothQuant 0.5: 2 MatMuls kept fp32 to meet cosine 0.998 with 8 bits, 8 with 7; README,
Precisions).
"""

from __future__ import annotations

import functools
import platform

# /proc/cpuinfo flags of the x86 instructions that multiply u8 x s8 into int32 without saturating
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def exact_int8_dot(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's u8 x s8 MatMuls run without int16 saturation here (VNNI, AMX, ARM): 8-bit
    weights are then safe. Unknown x86 CPUs count as saturating (7 bits is what works everywhere)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return True
    return bool(set(EXACT_INT8_FLAGS) & (cpu_flags() if flags is None else flags))


def int8_instructions() -> str:
    """The instructions ``exact_int8_dot`` found, for messages ("avx512_vnni", "AVX2 without VNNI")."""
    found = [f for f in EXACT_INT8_FLAGS if f in cpu_flags()]
    if found:
        return ", ".join(found)
    return platform.machine() if exact_int8_dot() else "no VNNI or AMX"
