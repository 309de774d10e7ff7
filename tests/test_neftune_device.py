"""NEFTune noise: drawn on the embeddings' device, seeded by the step (resumes draw the same noise)."""

from __future__ import annotations

import math

import torch

from t2l_framework.training import module as module_mod
from t2l_framework.training.module import neftune_noise


def test_noise_is_seeded_by_the_step_and_matches_the_cpu_formula():
    embeds = torch.randn(3, 7, 16)
    first, again, next_step = (neftune_noise(embeds, 5.0, 7, seed) for seed in (42, 42, 43))
    assert torch.equal(first, again) and not torch.equal(first, next_step)
    # On the CPU exactly what the earlier CPU generator drew, so CPU runs keep their numbers.
    gen = torch.Generator(device="cpu").manual_seed(42)
    expected = (torch.rand(embeds.shape, generator=gen) * 2 - 1) * (5.0 / math.sqrt(7 * 16))
    assert torch.equal(first, expected)
    assert first.abs().max() <= 5.0 / math.sqrt(7 * 16)
    half = neftune_noise(embeds.bfloat16(), 5.0, 7, 42)
    assert half.dtype == torch.bfloat16 and half.shape == embeds.shape


def test_generator_and_noise_are_made_on_the_embeddings_device(monkeypatch):
    """'meta' stands in for a GPU: the generator and the draw must name the embeddings' device."""
    made, drawn = [], []
    real_generator, real_rand = torch.Generator, torch.rand

    def generator(device="cpu"):
        made.append(torch.device(device))
        return real_generator(device="cpu")

    def rand(shape, generator=None, device=None, dtype=None):
        drawn.append(None if device is None else torch.device(device))
        return real_rand(shape, generator=generator, dtype=dtype)

    monkeypatch.setattr(module_mod.torch, "Generator", generator)
    monkeypatch.setattr(module_mod.torch, "rand", rand)
    neftune_noise(torch.empty(2, 3, 4, device="meta"), 5.0, 3, 0)
    assert made == [torch.device("meta")] and drawn == [torch.device("meta")]
