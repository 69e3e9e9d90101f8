"""What this machine's CPU computes natively, and so which dtype the CPU engine runs in.

Imports no vLLM.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_dtype(cpuinfo: Path = CPUINFO) -> str:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32.

    Without those instructions PyTorch emulates bfloat16 matrix products: on an AVX2-only CPU
    a bfloat16 prefill step of the default model took 30 times longer than the profile's
    (measured on a CPU with AVX512-BF16), and float32 is several times faster than bfloat16 there.
    """
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        return "bfloat16"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"
