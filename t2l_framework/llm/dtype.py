"""Choosing the base model's dtype: ``auto`` = bfloat16 where the hardware does it natively.

On CPUs without native bf16 (AVX2 only: no AVX512_BF16, no AMX) a bf16 matmul is emulated
and ~30x slower than float32, so ``auto`` picks float32 there. The same rule is used by
``t2l fit``, ``eval``, ``generate`` and ``serve``.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from t2l_framework.errors import T2LError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype picked for a device, with the reason shown to the user."""

    dtype: torch.dtype
    name: str
    reason: str

    def describe(self) -> str:
        return f"dtype {self.name} ({self.reason})"


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> tuple[bool, str]:
    """(native bf16 on this CPU?, which evidence) from torch's CPU capability or the CPU flags."""
    flags = cpu_flags()
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return True, flag.upper()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = ""
    if not flags and sys.platform == "darwin" and "arm" in capability.lower():
        return True, "Apple silicon"
    return False, f"CPU has no AVX512_BF16 or AMX (torch capability {capability or 'unknown'})"


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
