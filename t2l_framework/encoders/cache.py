"""Embed a fixed list of descriptions once; training re-reads the rows every epoch.

Embedding runs on the device the run trains on (a GPU embeds ~40x faster than a CPU: 61k
descriptions at the paper's scale would take ~30 minutes on CPU), in batches of texts of
similar length (little padding), with a progress bar; rows come back in the order given.

With ``cache_dir`` the table is also stored as safetensors, keyed by a hash of everything
that changes the numbers (encoder model, pooling, prefix, normalisation and its scale, the
full-stop rule and the texts: the encoder's ``metadata``), so a stale cache is never read
back, e.g. unit-norm rows are never served to a sqrt(dim)-norm run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from t2l_framework.atomic import atomic_file
from t2l_framework.errors import T2LError


def cache_key(metadata: dict, texts: Sequence[str]) -> str:
    """sha256 hex digest of the encoder metadata and the exact texts."""
    payload = json.dumps({"encoder": metadata, "texts": list(texts)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def encode_sorted(encoder, texts: list[str], device: str | torch.device | None = None,
                  progress: bool = True) -> torch.Tensor:
    """``encoder.encode`` over ``texts`` in batches of similar character length, on ``device``.

    Returns ``[len(texts), dim]`` float32 on the CPU, rows in the order of ``texts``. Batches
    are ``encoder.batch_size`` texts (64 when it has none), so a ``BaseEncoder`` makes one
    forward per batch. An ``nn.Module`` encoder goes back to its own device afterwards, so it
    holds no accelerator memory while the run trains.
    """
    if not texts:
        return encoder.encode([]).detach().float().cpu()
    size = int(getattr(encoder, "batch_size", 64) or 64)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    home = _module_device(encoder)
    if str(device) == "cuda" and os.environ.get("LOCAL_RANK"):  # one process per GPU: each embeds on its own
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if device is not None and home is not None:
        encoder.to(device)
    try:
        chunks = []
        with tqdm(total=len(texts), desc="embedding descriptions", unit="text", disable=None if progress else True,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(order), size):
                batch = [texts[i] for i in order[start:start + size]]
                chunks.append(encoder.encode(batch).detach().float().cpu())
                bar.update(len(batch))
    finally:
        if device is not None and home is not None:
            encoder.to(home)
    out = torch.empty(len(texts), chunks[0].shape[1])
    out[torch.tensor(order)] = torch.cat(chunks)
    return out.contiguous()


def _module_device(encoder) -> torch.device | None:
    """The device of an ``nn.Module`` encoder's first parameter or buffer; None if it has none."""
    if not isinstance(encoder, nn.Module):
        return None
    for tensor in (*encoder.parameters(), *encoder.buffers()):
        return tensor.device
    return None


class EmbeddingCache:
    """All embeddings of ``texts`` as one ``[n, dim]`` CPU table, read by index or by text.

    encoder: a TextEncoder; its ``metadata`` dict (if any) joins the cache key.
    device: where to encode (an ``nn.Module`` encoder is moved there and back); None = where it is.
    progress: show a progress bar over the encoder batches (on a terminal).
    """

    def __init__(self, encoder, texts: Sequence[str], cache_dir: str | Path | None = None,
                 device: str | torch.device | None = None, progress: bool = True):
        self.texts = list(texts)
        self.index = {t: i for i, t in enumerate(self.texts)}  # duplicates map to their last row: same vector
        meta = getattr(encoder, "metadata", {"class": type(encoder).__qualname__})
        self.key = cache_key(meta, self.texts)
        self.path = Path(cache_dir) / f"embeddings-{self.key[:32]}.safetensors" if cache_dir else None
        if self.path is not None and self.path.exists():
            self.embeddings = load_file(str(self.path))["embeddings"]
        else:
            self.embeddings = encode_sorted(encoder, self.texts, device, progress)  # [n, dim]
            if self.path is not None:
                with atomic_file(self.path) as tmp:  # a torn cache would be read by the next run
                    save_file({"embeddings": self.embeddings}, str(tmp), metadata={"key": self.key})

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
