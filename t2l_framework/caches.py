"""Where t2l-framework keeps what it can recompute: one root, one sub-folder per kind.

The root is ``$T2L_CACHE``, else ``~/.cache/t2l``; under it ``models/`` (GGUF files converted
to safetensors once), ``eval/`` (``t2l eval`` results per adapter, description and benchmark)
and ``inspect/`` (embedded training descriptions of a run, for familiarity). Deleting any of
them only costs the time to rebuild it. ``T2L_CACHE_DIR`` (the older name of the root, for
``eval/`` and ``inspect/``) is still read when ``T2L_CACHE`` is not set.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from t2l_framework.console import say

ENV, DEPRECATED_ENV = "T2L_CACHE", "T2L_CACHE_DIR"
SUBFOLDERS = ("models", "eval", "inspect")


@functools.lru_cache(maxsize=1)
def _deprecated_notice() -> None:
    say(f"${DEPRECATED_ENV} is deprecated: set ${ENV} (the same root) instead")


def cache_root() -> Path:
    """``$T2L_CACHE``, else the deprecated ``$T2L_CACHE_DIR``, else ``~/.cache/t2l``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    if os.environ.get(DEPRECATED_ENV):
        _deprecated_notice()
        return Path(os.environ[DEPRECATED_ENV]).expanduser()
    return Path.home() / ".cache" / "t2l"


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cache (``SUBFOLDERS``); not created here."""
    if kind not in SUBFOLDERS:
        raise ValueError(f"unknown cache kind {kind!r}; expected one of {SUBFOLDERS}")
    return cache_root() / kind
