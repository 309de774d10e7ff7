"""Optimisation levers as recipe options: the head-bias learning rate (training.lr_head_bias)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from t2l_framework.config import Recipe
from t2l_framework.training.module import T2LModule, param_groups
from tests.test_hypernet import ENC_DIM, tiny


def _one_step(factor: float):
    """Parameters before and after one AdamW step of the recipe's optimizer on a toy loss."""
    torch.manual_seed(0)
    hyper = tiny("per_layer")
    recipe = OmegaConf.structured(Recipe)
    recipe.training.lr, recipe.training.lr_head_bias, recipe.training.warmup_steps = 1e-2, factor, 0
    module = T2LModule(recipe, hyper)
    opt = module.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in hyper.named_parameters()}
    w = hyper(torch.randn(3, ENC_DIM))
    loss = sum((w.A[m] - 1).pow(2).mean() + (w.B[m] - 1).pow(2).mean() for m in w.A)
    loss.backward()
    opt.step()
    return before, dict(hyper.named_parameters()), opt


def test_head_bias_learning_rate_is_its_own_group():
    before, after, opt = _one_step(0.0)
    bias = [n for n in before if n.startswith("head.") and n.endswith(".bias")]
    assert bias and [g["lr"] for g in opt.param_groups] == [1e-2, 0.0]
    assert all(torch.equal(before[n], after[n]) for n in bias)
    assert any(not torch.equal(before[n], after[n]) for n in before if n not in bias)
    # the default: one group, the head's bias trains with everything else
    before, after, opt = _one_step(1.0)
    assert len(opt.param_groups) == 1 and all(not torch.equal(before[n], after[n]) for n in bias)


def test_param_groups_of_a_module_without_a_head_is_one_group():
    lin = torch.nn.Linear(3, 2)
    assert [len(g["params"]) for g in param_groups(lin, 1e-3, 5.0)] == [2]
