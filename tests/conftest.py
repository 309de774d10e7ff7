"""Shared fixtures: tiny random decoder-only models (fp32, seeded) for fast CPU tests."""

from __future__ import annotations

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _tiny(config_cls_name: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_cls_name)(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_llama():
    """Factory: ``tiny_llama(seed=0)`` -> a 2-layer LlamaForCausalLM, frozen, eval mode."""
    return lambda seed=0: _tiny("LlamaConfig", seed)


@pytest.fixture
def tiny_mistral():
    """Factory: ``tiny_mistral(seed=0)`` -> a 2-layer MistralForCausalLM, frozen, eval mode."""
    return lambda seed=0: _tiny("MistralConfig", seed)
