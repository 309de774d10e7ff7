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

    replace: an existing ``path`` is moved aside, the new folder renamed in, then the old one
    removed (put back if the rename fails), so at every moment ``path`` is the old folder, the
    new one, or absent with the old one kept next to it; without it, an existing non-empty
    ``path`` makes the rename fail with ``OSError`` (another writer won: callers decide)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = None
    try:
        yield tmp
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.rename(path, old / path.name)
        try:
            os.rename(tmp, path)
        except OSError:
            if old is not None:
                os.rename(old / path.name, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and path.exists():  # else the old folder is all there is: keep it
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text`` that never leaves a torn file: the older file or the whole new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)
