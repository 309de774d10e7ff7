"""Atomic writes: a file or folder appears whole at its final path, or not at all.

Readers (a resumed run, another process, a later ``t2l`` command) never see a half-written
checkpoint, adapter, cache entry or report: everything is written to a temporary name in the
same folder (same filesystem) and renamed into place, and the temporary is removed on failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on a clean exit it replaces ``path``.

    suffix: kept on the temporary name (some writers pick the format from it, e.g. ``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yields a temporary folder next to ``path``; on a clean exit it is renamed to ``path``.

    replace: an existing ``path`` is removed first; without it, an existing non-empty ``path``
    makes the rename fail with ``OSError`` (another writer won: callers decide what that means)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
