"""The prefix KV cache of ``T2LRuntime.chat``: the same answers as without it, one prefill per adapter."""

from __future__ import annotations

import pytest

from t2l_framework.assembly import load_runtime
from tests.tiny_world import build_trained_world

APPLE = "answer every input with the word apple variant 1"
TIGER = "answer every input with the word tiger variant 1"
PROMPTS = ["red blue small", "green fast", "cold warm bright red blue", "small"]


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    world = build_trained_world(tmp_path_factory.mktemp("prefix_world"), "prefix")
    cached, plain = load_runtime(world["run"], dtype="float32"), load_runtime(world["run"], dtype="float32")
    plain.use_prefix_cache = False
    return cached, plain


def _strong(runtime, descriptions):
    """The tiny world's adapters are weak after a few steps: amplified, rows really answer differently."""
    w = runtime.adapters(descriptions)
    return w.with_factors(w.A, {m: b * 200 for m, b in w.B.items()})


def test_cached_prefix_gives_the_same_answers(runtimes):
    cached, plain = runtimes
    cache = cached.prefix_cache()
    assert cache is not None and len(cache.prefix) >= 2  # the template's head, shared by every prompt
    assert all(cached.encode(p)[:len(cache.prefix)] == cache.prefix for p in PROMPTS)
    w = _strong(cached, [APPLE, TIGER])
    apple, tiger = w.select(0), w.select(1)  # as serving holds them: one object per adapter
    rows = [apple, None, tiger, apple]  # two adapters, a base row, a repeated adapter
    budgets = [5, 3, 6, 4]
    want = plain.chat(PROMPTS, rows, max_new_tokens=budgets)
    got = cached.chat(PROMPTS, rows, max_new_tokens=budgets)
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.completion_tokens for c in got] == [c.completion_tokens for c in want]
    assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in want]
    assert got[0].text != got[1].text  # the adapter's prefix KV differs from the base model's
    assert cache.misses == 3 and cache.hits == 1  # one prefill per distinct adapter (base included)
    again = cached.chat(PROMPTS, rows, max_new_tokens=budgets)
    assert [c.text for c in again] == [c.text for c in want] and cache.misses == 3 and cache.hits == 5


def test_a_new_adapter_never_reuses_another_ones_prefix(runtimes):
    cached, plain = runtimes
    for desc in (APPLE, TIGER):  # a fresh LoraWeights object each time, shared by the batch (batch 1)
        w = _strong(cached, [desc])
        assert [c.text for c in cached.chat(PROMPTS[:2], w, max_new_tokens=5)] == \
               [c.text for c in plain.chat(PROMPTS[:2], w, max_new_tokens=5)]
    w = _strong(cached, [APPLE, TIGER])  # batch-n weights: row i has adapter i
    assert [c.text for c in cached.chat(PROMPTS[:2], w, max_new_tokens=5)] == \
           [c.text for c in plain.chat(PROMPTS[:2], w, max_new_tokens=5)]


def test_prompts_without_the_template_head_skip_the_cache(runtimes):
    cached, plain = runtimes
    cache = cached.prefix_cache()
    raw = [cached.tokenizer("red blue small", add_special_tokens=False)["input_ids"], cached.encode("green")]
    assert not cache.usable(raw)
    before = (cache.hits, cache.misses)
    assert [c.text for c in cached.chat(raw, None, max_new_tokens=4)] == \
           [c.text for c in plain.chat(raw, None, max_new_tokens=4)]
    assert (cache.hits, cache.misses) == before
