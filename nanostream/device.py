"""Which device and numeric precision inference and training use."""

from __future__ import annotations

import contextlib
import functools
import os

import torch


def default_device() -> torch.device:
    """CUDA when present, else the CPU. NANOSTREAM_DEVICE overrides (e.g. "cpu" on a GPU box)."""
    name = os.environ.get("NANOSTREAM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision(device: torch.device) -> str:
    """"bf16" where the hardware runs it natively, else "fp32"; NANOSTREAM_PRECISION overrides.

    Frozen-backbone features in bf16 classify as well as fp32 ones (bench/bench_train.py
    prints both) and take half the time on CPUs with AVX512-BF16 or AMX.
    """
    choice = os.environ.get("NANOSTREAM_PRECISION", "auto")
    if choice in ("fp32", "bf16"):
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_bf16() else "fp32"


def autocast(device: torch.device, mode: str):
    """Autocast context for the chosen precision (a no-op for fp32)."""
    if mode != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
