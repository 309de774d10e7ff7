"""Choosing the base model's dtype: ``auto`` = bfloat16 where the hardware does it natively.

On CPUs without native bf16 (AVX2 only: no AVX512_BF16, no AMX; Apple M1; Arm cores without
the BF16 extension) a bf16 matmul is emulated and ~30x slower than float32, so ``auto`` picks
float32 there. On CUDA it picks bfloat16 where the GPU supports it, else float16. The same rule
is used by ``t2l fit``, ``eval``, ``generate`` and ``serve``.

``T2L_CPU_BF16=1`` (or ``0``) overrides what ``auto`` believes about the CPU: CI uses it to run
the dtype-sensitive tests under the pick the machine would not make (``.ci/run``).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from t2l_framework.config import CHOICES
from t2l_framework.errors import T2LError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = CHOICES["base_model.dtype"]  # the recipe schema's; the CLI's --dtype offers them too
CPU_BF16_ENV = "T2L_CPU_BF16"


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype picked for a device, with the reason shown to the user."""

    dtype: torch.dtype
    name: str
    reason: str

    def describe(self) -> str:
        return f"dtype {self.name} ({self.reason})"


@dataclass(frozen=True)
class CpuInfo:
    """What the bf16 rule looks at: Linux's CPU flags (x86 ``flags`` / Arm ``Features``), the OS,
    the machine (``platform.machine()``), torch's CPU capability, and on macOS whether the
    chip reports ``hw.optional.arm.FEAT_BF16`` (M2 and later; None where unknown)."""

    flags: frozenset[str]
    system: str
    machine: str
    capability: str
    darwin_feat_bf16: bool | None = None


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _darwin_feat_bf16() -> bool | None:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out == "1" if out in ("0", "1") else None


def this_cpu() -> CpuInfo:
    """The ``CpuInfo`` of the machine at hand."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = ""
    darwin = sys.platform == "darwin" and platform.machine() == "arm64"
    return CpuInfo(frozenset(cpu_flags()), sys.platform, platform.machine(), capability,
                   _darwin_feat_bf16() if darwin else None)


def native_bf16(cpu: CpuInfo) -> tuple[bool, str]:
    """(native bf16 on ``cpu``?, which evidence): the rule itself, free of the machine at hand."""
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in cpu.flags:
            return True, flag.upper()
    if cpu.system == "darwin" and cpu.machine == "arm64":
        if cpu.darwin_feat_bf16:
            return True, "Apple silicon with FEAT_BF16"
        return False, "Apple silicon without FEAT_BF16 (M1)" if cpu.darwin_feat_bf16 is False else \
            "Apple silicon that does not report FEAT_BF16"
    if cpu.machine in ("aarch64", "arm64"):
        if "bf16" in cpu.flags:
            return True, "Arm BF16 extension"
        return False, "Arm CPU without the BF16 extension"
    return False, f"CPU has no AVX512_BF16 or AMX (torch capability {cpu.capability or 'unknown'})"


@functools.lru_cache(maxsize=None)
def detected_cpu_bf16() -> tuple[bool, str]:
    """``native_bf16`` of this machine (read once)."""
    return native_bf16(this_cpu())


def cpu_has_native_bf16() -> tuple[bool, str]:
    """(native bf16?, why) for this CPU, unless ``T2L_CPU_BF16`` says otherwise (read on every call)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("1", "0"):
        return forced == "1", f"{CPU_BF16_ENV}={forced}"
    if forced:
        raise T2LError(f"environment variable {CPU_BF16_ENV}: expected 0 or 1 (or unset)")
    return detected_cpu_bf16()


def pick_dtype(name: str, device: str | torch.device | None = None, key: str = "base_model.dtype") -> DtypeChoice:
    """Resolve a dtype name; ``auto`` = bfloat16 on GPUs and native-bf16 CPUs, float32 otherwise."""
    if name != "auto":
        try:
            return DtypeChoice(DTYPES[name], str(DTYPES[name]).removeprefix("torch."), "set explicitly")
        except KeyError:
            raise T2LError(f"{key}: unknown dtype '{name}'; expected one of {', '.join(DTYPE_CHOICES)}") from None
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "bfloat16", "auto: GPU with bf16")
        return DtypeChoice(torch.float16, "float16", "auto: GPU without bf16")
    if dev.type == "cpu":
        native, why = cpu_has_native_bf16()
        if native:
            return DtypeChoice(torch.bfloat16, "bfloat16", f"auto: CPU with native bf16 ({why})")
        return DtypeChoice(torch.float32, "float32", f"auto: {why}; bf16 would be emulated and ~30x slower")
    return DtypeChoice(torch.float32, "float32", f"auto: {dev.type} device")
