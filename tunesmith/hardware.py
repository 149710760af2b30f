"""What this machine's CPU can do fast, read from /proc/cpuinfo: `tunesmith env` reports it, and training asks
it before running bf16 autocast on a CPU (emulated bf16 matrix multiplies are far slower than fp32 ones)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model, cores and speed-relevant flags (from /proc/cpuinfo; flags None where it is absent)."""
    if cpuinfo.is_file():
        parsed = parse_cpuinfo(cpuinfo.read_text())
    else:  # not Linux: no flags to read
        parsed = {"model": platform.processor() or None, "physical_cores": None, "flags": None, "bf16": None,
                  "amx": None}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return parsed | {"logical_cores": os.cpu_count(), "usable_cores": usable}


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name, physical cores and CPU_FLAGS of /proc/cpuinfo text; `bf16`: the CPU has bf16 instructions
    (AVX512-BF16 or AMX-BF16), so bf16 autocast on CPU runs in hardware, not emulated."""
    model, flags, cores = None, set(), set()
    for block in text.strip().split("\n\n"):
        fields = dict(_field(line) for line in block.splitlines() if ":" in line)
        model = model or fields.get("model name") or fields.get("Model") or fields.get("Hardware")
        flags |= set((fields.get("flags") or fields.get("Features") or "").split())
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    found = {flag: flag in flags for flag in CPU_FLAGS}
    return {"model": model, "physical_cores": len(cores) or None, "flags": found,
            "bf16": found["avx512_bf16"] or found["amx_bf16"], "amx": found["amx_tile"]}


def _field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd")  # NVIDIA's driver; AMD's (ROCm builds of torch use it)


def may_have_gpu() -> bool:
    """False where torch cannot see a GPU: no GPU driver's device file, or CUDA_VISIBLE_DEVICES set empty. Asking
    torch costs seconds of imports, which a command that only reads files should not pay on a CPU machine; where
    this is True, ask `torch.cuda.is_available()`."""
    import glob

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch where `may_have_gpu` says no GPU can be seen."""
    if not may_have_gpu():
        return False
    import torch

    return torch.cuda.is_available()
