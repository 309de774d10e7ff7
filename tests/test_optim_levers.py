"""Optimisation levers as recipe options: the head-bias learning rate (training.lr_head_bias)."""

from __future__ import annotations

import pytest
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


def test_output_offset_is_added_in_the_networks_scaling_and_survives_save_and_load(tmp_path):
    from t2l_framework.hypernet import HyperNetwork
    from tests.test_hypernet import TINY
    from tests.test_lora import random_weights

    hyper = tiny("per_layer")
    emb = torch.randn(3, ENC_DIM)
    hyper.eval()
    with torch.no_grad():
        plain = hyper(emb)
        offset = random_weights(TINY, batch=1, rank=2, alpha=3.0)  # smaller rank, another scaling
        hyper.set_output_offset(offset)
        shifted = hyper(emb)
    for m in TINY.modules:
        pad_a = torch.zeros(TINY.n_layers, 4, TINY.shapes[m][0])
        pad_a[:, :2] = offset.A[m][0]
        assert torch.allclose(shifted.A[m] - plain.A[m], pad_a.expand_as(plain.A[m]), atol=1e-6)
        # the offset's own delta W: scaling_hyper * B_shift = scaling_offset * B_offset
        got = (shifted.B[m] - plain.B[m])[:, :, :, :2] * plain.scaling
        assert torch.allclose(got, (offset.B[m][0] * offset.scaling).expand_as(got), atol=1e-5)
    hyper.save_pretrained(tmp_path / "h")
    again = HyperNetwork.from_pretrained(tmp_path / "h")
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(emb).B["q_proj"], shifted.B["q_proj"])


def test_recipe_mtlora_offset_starts_the_hypernetwork_from_that_lora(tmp_path):
    from t2l_framework.assembly.fit import fit
    from t2l_framework.hypernet import HyperNetwork
    from t2l_framework.lora.peft_io import import_peft_adapter
    from tests.tiny_world import build_world

    world = build_world(tmp_path / "w")
    mt = fit(str(world["recipe"]), ["training.mode=lora", "trainer.max_steps=2", "training.run_name=mt"])
    run = fit(str(world["recipe"]), ["trainer.max_steps=1", "training.run_name=off", f"training.mtlora_offset={mt}"])
    hyper = HyperNetwork.from_pretrained(run / "hypernet")
    lora = import_peft_adapter(mt / "adapter")
    assert hyper.hypernet_cfg["output_offset"] is True
    for i, m in enumerate(hyper.shapes.modules):
        assert torch.allclose(getattr(hyper.output_offset, f"A{i}"), lora.A[m][0], atol=1e-6)
    plain = fit(str(world["recipe"]), ["trainer.max_steps=1", "training.run_name=plain"])
    assert HyperNetwork.from_pretrained(plain / "hypernet").output_offset is None


def test_output_standardisation_emits_z_x_std_plus_mean_and_survives_save_and_load(tmp_path):
    """recon_loss=factors_z: the head's raw output is a z-score of the library, entry by entry."""
    from t2l_framework.errors import T2LError
    from t2l_framework.hypernet import HyperNetwork
    from tests.test_hypernet import TINY
    from tests.test_lora import random_weights

    hyper = tiny("per_layer")
    emb = torch.randn(3, ENC_DIM)
    library = random_weights(TINY, batch=5, rank=4)
    hyper.eval()
    with torch.no_grad():
        raw = hyper(emb)
        hyper.set_output_standardisation(library)
        z = hyper(emb)
    for m in TINY.modules:
        for got, want, target in ((z.A[m], raw.A[m], library.A[m]), (z.B[m], raw.B[m], library.B[m])):
            expected = want * (target.std(0) + 1e-10) + target.mean(0)
            assert torch.allclose(got, expected, atol=1e-6)
    assert hyper.hypernet_cfg["output_scale"] is True
    with torch.no_grad():  # a zero z-score is the library's mean adapter
        for p in hyper.head.parameters():
            p.zero_()
        mean = hyper(emb)
    assert torch.allclose(mean.B["q_proj"][1], library.B["q_proj"].mean(0), atol=1e-7)
    hyper.save_pretrained(tmp_path / "h")
    again = HyperNetwork.from_pretrained(tmp_path / "h")
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(emb).A["v_proj"], mean.A["v_proj"])
    with pytest.raises(T2LError, match="2 or more"):
        tiny("per_layer").set_output_standardisation(random_weights(TINY, batch=1, rank=4))
