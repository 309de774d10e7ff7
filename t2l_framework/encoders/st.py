"""A ``sentence-transformers`` model as a text encoder (pooling comes from the model folder)."""

from __future__ import annotations

import torch

from t2l_framework.encoders.base import BaseEncoder, load_error, resolve_model
from t2l_framework.errors import T2LError


class SentenceTransformersEncoder(BaseEncoder):
    """``SentenceTransformer`` from a hub id or local folder; 'all-MiniLM-L6-v2' loads offline."""

    name = "sentence_transformers"

    def __init__(self, model: str = "all-MiniLM-L6-v2", prefix: str = "", normalize: bool = True,
                 max_length: int = 512, batch_size: int = 64, trust_remote_code: bool = False,
                 trainable: bool = False):
        super().__init__(model, prefix, normalize, batch_size, trainable, pooling="model")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise T2LError(
                "encoder.name: 'sentence_transformers' needs the sentence-transformers package; "
                "run `pip install sentence-transformers` or use encoder.name=transformers"
            ) from None
        path, local_only = resolve_model(model)
        try:
            self.model = SentenceTransformer(path, device="cpu", trust_remote_code=trust_remote_code,
                                             local_files_only=local_only)
        except (OSError, ValueError, ImportError) as exc:
            raise load_error(model, exc) from None
        # Never exceed the position table, whatever the recipe asks for.
        positions = getattr(self.model[0].auto_model.config, "max_position_embeddings", max_length)
        self.model.max_seq_length = min(max_length, positions)
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        self.freeze_unless_trainable()

    @classmethod
    def from_config(cls, cfg) -> "SentenceTransformersEncoder":
        """Build from an ``EncoderConfig`` (the ``encoder:`` recipe section)."""
        return cls(cfg.model, prefix=cfg.prefix, normalize=cfg.normalize, max_length=cfg.max_length,
                   batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)

    def embed_batch(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (b strings) -> sentence embeddings ``[b, dim]``.

        Calls the module directly rather than ``SentenceTransformer.encode`` so that a
        trainable encoder keeps its autograd graph.
        """
        # sentence-transformers 6 renamed tokenize -> preprocess; non-tensor entries stay as they are.
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prepare(texts).items()}
        return self.model(features)["sentence_embedding"]
