"""``AdapterGenerator``: the one entry point from task descriptions to LoRA weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from t2l_framework.errors import T2LError
from t2l_framework.lora.weights import LoraWeights

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from t2l_framework.config import BaseModelConfig
    from t2l_framework.encoders.base import TextEncoder
    from t2l_framework.hypernet.hypernetwork import HyperNetwork


@dataclass
class AdapterGenerator:
    """A trained hypernetwork and its text encoder: descriptions in, LoRA weights out.

    identity: sha256 of the hypernetwork's files; adapters are only comparable (and
    cacheable) under the same identity. name: the run's name. base_config: the
    ``BaseModelConfig`` it was trained for (None when built by hand, e.g. in a benchmark).
    """

    hypernet: HyperNetwork
    encoder: TextEncoder
    identity: str = ""
    name: str = ""
    base_config: BaseModelConfig | DictConfig | None = None  # the recipe's base_model section
    chat_template: bool = True

    @torch.inference_mode()
    def adapters(self, descriptions: str | Sequence[str]) -> LoraWeights:
        """One encoder + hypernetwork forward for all descriptions: A[m]: [n, layers, r, in],
        B[m]: [n, layers, out, r]."""
        descriptions = [descriptions] if isinstance(descriptions, str) else list(descriptions)
        if not descriptions or any(not str(d).strip() for d in descriptions):
            raise T2LError("task descriptions must be non-empty text")
        emb = self.encoder.encode(descriptions)  # [n, enc_dim]
        return self.hypernet(emb.to(self.hypernet.layer_idx.device))
