"""What a sandboxed program may use (``SandboxLimits``) and what came of it (``ExecutionResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

OUTPUT_CHARS = 2000  # ExecutionResult.output keeps this many characters (the tail)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``max_processes``: processes/threads the program may create."""

    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # RLIMIT_AS of the child
    max_processes: int = 16  # RLIMIT_NPROC headroom (enforced where the kernel can)
    max_file_mb: int = 16  # RLIMIT_FSIZE; the work dir holds at most 4x this

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_processes", "max_file_mb"):
            value = getattr(self, name)
            integral = name != "timeout_s"
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or (integral and not isinstance(value, int)) or not math.isfinite(value) or value <= 0):
                kind = "a positive integer" if integral else "a positive, finite number of seconds"
                raise ValueError(f"SandboxLimits.{name} must be {kind}, got {value!r}")

    @property
    def work_dir_bytes(self) -> int:
        """Everything the program may write, in all files together."""
        return 4 * self.max_file_mb << 20


@dataclass
class ExecutionResult:
    """status: ``passed`` (exit 0) | ``failed`` (non-zero exit, exception, signal) | ``timeout``.
    returncode: None on timeout (we killed it). output: tail of stdout+stderr."""

    status: str
    returncode: int | None
    duration_s: float
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"
