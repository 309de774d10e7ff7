"""Any ``transformers`` AutoModel as a text encoder, with mean or CLS pooling."""

from __future__ import annotations

import torch

from t2l_framework.encoders.base import BaseEncoder, load_error, resolve_model
from t2l_framework.errors import T2LError


class TransformersEncoder(BaseEncoder):
    """``AutoModel`` + ``AutoTokenizer`` from a hub id or local folder.

    pooling: ``mean`` (attention-masked mean of the last hidden states) or ``cls`` (first token,
    what gte-large-en-v1.5 uses).
    """

    name = "transformers"

    def __init__(self, model: str, pooling: str = "mean", prefix: str = "", normalize: bool = True,
                 max_length: int = 512, batch_size: int = 64, trust_remote_code: bool = False,
                 trainable: bool = False):
        if pooling not in ("mean", "cls"):
            raise T2LError(f"encoder.pooling: '{pooling}' is not allowed; expected one of: mean, cls")
        super().__init__(model, prefix, normalize, batch_size, trainable, pooling)
        from transformers import AutoModel, AutoTokenizer

        path, local_only = resolve_model(model)
        kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            self.model = AutoModel.from_pretrained(path, **kwargs)
        except (OSError, ValueError, ImportError) as exc:
            raise load_error(model, exc) from None
        # Never exceed the position table (a longer description is truncated, not an index error);
        # the tokenizer's own limit also covers models whose table holds offsets (RoBERTa: 514 for 512).
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        self.max_length = min(int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000)
        self.dim = int(self.model.config.hidden_size)
        self.freeze_unless_trainable()

    @classmethod
    def from_config(cls, cfg) -> "TransformersEncoder":
        """Build from an ``EncoderConfig`` (the ``encoder:`` recipe section)."""
        return cls(cfg.model, pooling=cfg.pooling, prefix=cfg.prefix, normalize=cfg.normalize,
                   max_length=cfg.max_length, batch_size=cfg.batch_size,
                   trust_remote_code=cfg.trust_remote_code)

    def embed_batch(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (b strings) -> pooled hidden states ``[b, hidden_size]``."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state  # [b, seq, hidden]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, seq, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
