"""E5 (``intfloat/e5-*``) as a T2L text encoder.

E5 models are trained with a role prefix on every input ("query: " or "passage: "), mean
pooling over the attention mask and L2-normalised outputs; embeddings made without the
prefix are measurably worse. A task description plays the query role, so "query: " is the
default. Pooling and batching are ``TransformersEncoder``'s; this class only fixes E5's
conventions.
"""

from __future__ import annotations

from t2l_framework.encoders import TransformersEncoder
from t2l_framework.encoders.base import MINILM_NAMES
from t2l_framework.errors import T2LError

DEFAULT_MODEL = "intfloat/e5-small-v2"
QUERY_PREFIX = "query: "


class E5Encoder(TransformersEncoder):
    """An E5 model: ``encode(texts) -> [n, hidden_size]`` L2-normalised rows of "query: " + text
    (scaled as ``encoder.normalize_scale`` says, like every encoder)."""

    name = "e5"

    def __init__(self, model: str = DEFAULT_MODEL, prefix: str = QUERY_PREFIX, normalize: bool = True,
                 max_length: int = 512, batch_size: int = 64, trust_remote_code: bool = False,
                 trainable: bool = False):
        super().__init__(model, pooling="mean", prefix=prefix, normalize=normalize, max_length=max_length,
                         batch_size=batch_size, trust_remote_code=trust_remote_code, trainable=trainable)

    @classmethod
    def from_config(cls, cfg) -> "E5Encoder":
        """Build from an ``EncoderConfig``.

        ``encoder.model`` left at the recipe default (MiniLM, not an E5 model) means
        ``intfloat/e5-small-v2``; an empty ``encoder.prefix`` means "query: ".
        """
        if cfg.pooling != "mean":
            raise T2LError(f"encoder.pooling: E5 models are trained with mean pooling; got '{cfg.pooling}'")
        model = DEFAULT_MODEL if not cfg.model or cfg.model in MINILM_NAMES else cfg.model
        return cls(model, prefix=cfg.prefix or QUERY_PREFIX, normalize=cfg.normalize, max_length=cfg.max_length,
                   batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
