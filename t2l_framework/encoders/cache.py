"""Embed a fixed list of descriptions once; training re-reads the rows every epoch.

With ``cache_dir`` the table is also stored as safetensors, keyed by a hash of everything
that changes the numbers (encoder model, pooling, prefix, normalisation and its scale, the
full-stop rule and the texts: the encoder's ``metadata``), so a stale cache is never read
back, e.g. unit-norm rows are never served to a sqrt(dim)-norm run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from t2l_framework.errors import T2LError


def cache_key(metadata: dict, texts: Sequence[str]) -> str:
    """sha256 hex digest of the encoder metadata and the exact texts."""
    payload = json.dumps({"encoder": metadata, "texts": list(texts)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class EmbeddingCache:
    """All embeddings of ``texts`` as one ``[n, dim]`` table, read by index or by text.

    encoder: a TextEncoder; its ``metadata`` dict (if any) joins the cache key.
    """

    def __init__(self, encoder, texts: Sequence[str], cache_dir: str | Path | None = None):
        self.texts = list(texts)
        self.index = {t: i for i, t in enumerate(self.texts)}  # duplicates map to their last row: same vector
        meta = getattr(encoder, "metadata", {"class": type(encoder).__qualname__})
        self.key = cache_key(meta, self.texts)
        self.path = Path(cache_dir) / f"embeddings-{self.key[:32]}.safetensors" if cache_dir else None
        if self.path is not None and self.path.exists():
            self.embeddings = load_file(str(self.path))["embeddings"]
        else:
            self.embeddings = encoder.encode(self.texts).detach().cpu().contiguous()  # [n, dim]
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"embeddings": self.embeddings}, str(self.path), metadata={"key": self.key})

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, idx: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Rows by position: an int gives ``[dim]``, a list or LongTensor of k gives ``[k, dim]``."""
        if isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        return self.embeddings[idx]

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """Rows for ``texts`` (each must be one of the cached descriptions): ``[k, dim]``."""
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise T2LError(f"description not in the embedding cache: {missing[0][:80]!r} "
                           f"({len(missing)} of {len(texts)} missing)")
        return self[[self.index[t] for t in texts]]
