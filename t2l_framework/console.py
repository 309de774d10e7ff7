"""One way to tell the user what is happening: ``[t2l] ...`` lines on stderr."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """Print a progress/status line for the user (stderr, so stdout stays machine-readable)."""
    print(f"[t2l] {msg}", file=sys.stderr, flush=True)
