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



def _watch_auto(item):
    """Run one phase of ``item`` (setup, which also builds module fixtures, call, teardown) and fail
    it when ``dtype: auto`` read this machine's CPU although it is not marked ``dtype_sensitive``.

    Such a test's result may depend on the processor, so `.ci/run` runs the marked ones again
    under the other pick (``T2L_CPU_BF16``); every other test fixes its dtype (float32) or
    simulates the CPU (tests/test_dtype.py)."""
    from t2l_framework.llm import dtype as dt

    real, real_cpu, real_flags, reads = dt.detected_cpu_bf16, dt.this_cpu, dt.cpu_flags, []

    def watched():
        if dt.this_cpu is real_cpu and dt.cpu_flags is real_flags:  # not a simulated CPU
            reads.append(True)
        return real()

    watched.cache_clear = real.cache_clear
    dt.detected_cpu_bf16 = watched
    try:
        result = yield
    finally:
        dt.detected_cpu_bf16 = real
    if reads and not item.get_closest_marker("dtype_sensitive"):
        raise pytest.fail.Exception("dtype 'auto' read this machine's CPU in a test not marked dtype_sensitive: "
                                    "fix its dtype (float32) if it compares numbers, else mark it "
                                    "@pytest.mark.dtype_sensitive", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _watch_auto(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _watch_auto(item))
