"""Generated adapters kept in memory: a bounded LRU keyed by description and hypernetwork.

An adapter id is the sha256 of the hypernetwork's identity and the description, so the same
description always maps to the same id for one hypernetwork, and never collides across two.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from t2l_framework.lora.weights import LoraWeights


def adapter_id(identity: str, description: str) -> str:
    return hashlib.sha256(f"{identity}\n{description}".encode()).hexdigest()[:32]


@dataclass
class Adapter:
    """One generated adapter (weights of batch 1, on the runtime's device)."""

    id: str
    description: str
    weights: LoraWeights
    generation_ms: float
    created: int = field(default_factory=lambda: int(time.time()))
    familiarity: dict | None = None  # serve/familiarity.py fills it on first use

    def info(self, runtime) -> dict:
        return {"id": self.id, "object": "adapter", "model": f"t2l:{self.id}", "description": self.description,
                "created": self.created, "generation_ms": round(self.generation_ms, 2),
                "base_model": runtime.base_model_name, "hypernetwork": runtime.name, "rank": self.weights.rank,
                "alpha": self.weights.alpha,
                "use_rslora": self.weights.use_rslora, "target_modules": self.weights.modules,
                "download_url": f"/v1/adapters/{self.id}"}


class AdapterCache:
    """Least-recently-used store of at most ``capacity`` adapters."""

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self.items: OrderedDict[str, Adapter] = OrderedDict()
        self.hits = self.misses = self.generated = self.evicted = 0

    def get(self, key: str) -> Adapter | None:
        item = self.items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return item

    def put(self, item: Adapter) -> None:
        self.generated += 1
        self.items[item.id] = item
        self.items.move_to_end(item.id)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
            self.evicted += 1

    def stats(self) -> dict:
        return {"size": len(self.items), "capacity": self.capacity, "hits": self.hits, "misses": self.misses,
                "generated": self.generated, "evicted": self.evicted}


def adapter_zip(write: Callable[[Path], Path], item: Adapter, hypernetwork: str, identity: str) -> bytes:
    """The adapter as a zip of a PEFT folder (files at the top level) plus ``t2l_adapter.json``.

    write: ``T2LRuntime.adapter_writer(item.weights)``, made on the model thread; it holds its
    own CPU copy of the adapter, so this (file writing and zipping) runs on any thread."""
    with tempfile.TemporaryDirectory(prefix="t2l-adapter-") as tmp:
        folder = write(Path(tmp) / "adapter")
        (folder / "t2l_adapter.json").write_text(json.dumps(
            {"description": item.description, "hypernetwork": hypernetwork, "hypernetwork_sha256": identity},
            indent=2) + "\n")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.iterdir()):
                zf.write(path, path.name)
    return buf.getvalue()
