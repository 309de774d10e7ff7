"""Reading data files, plain or gzip-compressed: the one helper every data reader goes through.

The bundled ``data/`` folder stores its large JSONL / JSON files gzip-compressed (``*.jsonl.gz``,
written with ``gzip -9 -n`` so the bytes are reproducible) to keep the tree small enough to
travel; a user's own files are usually plain. Which one a file is follows from its name alone
(a ``.gz`` suffix), so a file is never guessed at, and the content read is the same bytes
either way (``data/MANIFEST.json`` gives the sha256 of that content).
"""

from __future__ import annotations

import gzip
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from t2l_framework.errors import T2LError

GZIP_SUFFIX = ".gz"
_CORRUPT = (gzip.BadGzipFile, EOFError, zlib.error)


def is_compressed(path: str | Path) -> bool:
    return str(path).endswith(GZIP_SUFFIX)


@contextmanager
def open_binary(path: str | Path) -> Iterator[IO[bytes]]:
    """The file's content as a binary stream (decompressed for ``*.gz``); T2LError naming the
    file when it cannot be read or is not valid gzip."""
    path = Path(path)
    try:
        handle = gzip.open(path, "rb") if is_compressed(path) else open(path, "rb")
    except OSError as err:
        raise T2LError(f"{path}: cannot read the file ({err.strerror or err})") from None
    try:
        with handle:
            yield handle
    except _CORRUPT as err:
        raise T2LError(f"{path}: not a valid gzip file ({err})") from None


def read_bytes(path: str | Path) -> bytes:
    """The whole content (decompressed for ``*.gz``)."""
    with open_binary(path) as handle:
        return handle.read()


def read_text(path: str | Path) -> str:
    """The whole content as UTF-8 text."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise T2LError(f"{path}: not UTF-8 text (byte {err.start})") from None


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) for every line, streaming; T2LError on unreadable files."""
    with open_binary(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise T2LError(f"{path}:{lineno}: not UTF-8 text (byte {err.start})") from None
