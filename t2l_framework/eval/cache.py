"""A result cache for evaluations: one JSON file per (model, adapter, benchmark, settings).

Re-running ``t2l eval`` with the same arguments answers from here; changing any part of the
key (another adapter file, data file, prompt version, limit or scoring setting) misses.
Files are written atomically, so an interrupted run never leaves a broken entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from t2l_framework.atomic import atomic_file
from t2l_framework.caches import cache_dir


def default_cache_dir() -> Path:
    return cache_dir("eval")


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ResultCache:
    """``get(parts)`` / ``put(parts, value)``; ``folder=None`` disables caching."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        self.hits = self.misses = 0

    def _file(self, parts: dict) -> Path:
        return self.folder / f"{cache_key(parts)}.json"

    def get(self, parts: dict) -> dict | None:
        if self.folder is None:
            return None
        try:
            entry = json.loads(self._file(parts).read_text())
        except (OSError, json.JSONDecodeError):
            self.misses += 1
            return None
        if entry.get("key") != json.loads(json.dumps(parts, sort_keys=True, default=str)):
            self.misses += 1  # a hash collision or a hand-edited file: recompute
            return None
        self.hits += 1
        return entry["value"]

    def put(self, parts: dict, value: dict) -> None:
        if self.folder is None:
            return
        with atomic_file(self._file(parts)) as tmp, open(tmp, "w") as f:
            json.dump({"key": json.loads(json.dumps(parts, sort_keys=True, default=str)), "value": value}, f)
