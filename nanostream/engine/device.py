"""Which device and numeric precision inference and training use, and what the CPU offers."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when present, else the CPU. NANOSTREAM_DEVICE overrides (e.g. "cpu" on a GPU box)."""
    name = os.environ.get("NANOSTREAM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class CpuInfo:
    model: str              # "Intel(R) Xeon(R) Processor", "AMD EPYC 7B13", ...
    flags: frozenset[str]   # from /proc/cpuinfo
    bf16_kernels: bool      # torch's oneDNN will run bf16 convolutions here (avx512bw/vl/dq or avx_ne_convert)

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512-BF16 or AMX): only there is bf16 faster than fp32."""
        return self.bf16_kernels and bool({"avx512_bf16", "amx_bf16"} & self.flags)

    def describe(self) -> str:
        """One line for benchmarks and logs: a figure is only meaningful with the CPU beside it."""
        isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in self.flags), "no AVX2")
        # Both said either way: an AVX-512-BF16 CPU without AMX (AMD's EPYC) is a kind of its own.
        bf16 = ", ".join(f"{name} {'yes' if flag in self.flags else 'no'}"
                         for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")))
        return f"{self.model}; {isa}; {bf16}; bf16 kernels {'yes' if self.bf16_kernels else 'no'}"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break  # every core lists the same
    except OSError:
        pass
    # torch's own check, the one its bf16 convolution enforces (else "bf16 path needs the cpu support ...").
    kernels = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return CpuInfo(model, flags, bool(kernels))


def precision(device: torch.device) -> str:
    """"bf16" where the hardware runs it natively, else "fp32"; NANOSTREAM_PRECISION overrides.

    Frozen-backbone features in bf16 classify as well as fp32 ones (bench/bench_train.py
    prints both) and take half the time on CPUs with AVX512-BF16 or AMX. Elsewhere bf16 is
    emulated (slower than fp32) or, without AVX-512, cannot run at all: a forced "bf16" there
    falls back to fp32 with a log line, rather than failing every build.
    """
    choice = os.environ.get("NANOSTREAM_PRECISION", "auto")
    if device.type == "cuda":
        return choice if choice in ("fp32", "bf16") else ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    cpu = cpu_info()
    if choice == "bf16" and not cpu.bf16_kernels:
        log.warning("NANOSTREAM_PRECISION=bf16 ignored: this CPU (%s) has no bf16 kernels; using fp32", cpu.describe())
        return "fp32"
    if choice in ("fp32", "bf16"):
        return choice
    return "bf16" if cpu.native_bf16 else "fp32"


def autocast(device: torch.device, mode: str):
    """Autocast context for the chosen precision (a no-op for fp32)."""
    if mode != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def machine_summary(device: torch.device | None = None) -> str:
    """What a benchmark prints before its figures: a figure holds for one kind of CPU, not for all."""
    device = device or default_device()
    where = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU"
    # A cap on the kernels (how an AVX2 machine is emulated on an AVX-512 one) must show beside the figures.
    capped = [f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(name)]
    return (f"CPU: {cpu_info().describe()}" + (f"; kernels capped by {', '.join(capped)}" if capped else "") + "\n"
            f"runs on: {where}, precision {precision(device)}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
