"""Text encoders: task description -> task embedding (``TextEncoder`` protocol and built-ins)."""

from t2l_framework.encoders.base import BaseEncoder, TextEncoder, add_full_stop, minilm_path, resolve_model
from t2l_framework.encoders.cache import EmbeddingCache, cache_key
from t2l_framework.encoders.hf import TransformersEncoder
from t2l_framework.encoders.st import SentenceTransformersEncoder

__all__ = [
    "TextEncoder", "BaseEncoder", "TransformersEncoder", "SentenceTransformersEncoder",
    "EmbeddingCache", "cache_key", "add_full_stop", "minilm_path", "resolve_model", "make_encoder",
]


def make_encoder(factory, cfg) -> TextEncoder:
    """The encoder ``factory(cfg)`` builds for an ``EncoderConfig``, with the recipe's text policy.

    factory: what an encoder plugin registered; ``t2l_framework.assembly.build_encoder`` looks
    it up by ``encoder.name``.
    """
    encoder = factory(cfg)
    if isinstance(encoder, BaseEncoder):  # one text/scale policy for built-in and plugin encoders alike
        encoder.set_text_policy(getattr(cfg, "normalize_scale", "sqrt_dim"), getattr(cfg, "full_stop", True))
    return encoder
