"""A third-party family with a fused q|k|v projection (examples/gpt2_family.py, GPT-2's Conv1D
``c_attn``): found through a plugin, LoRA on the q and v slices only, exact against a reference."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from t2l_framework.config import HypernetConfig, LoraConfig
from t2l_framework.errors import T2LError
from t2l_framework.hypernet.hypernetwork import HyperNetwork
from t2l_framework.llm.families import find_family
from t2l_framework.lora.batched import BatchedLoraLinear, inject_lora
from t2l_framework.lora.peft_io import export_peft_adapter
from t2l_framework.lora.weights import LoraWeights
from t2l_framework.assembly import model_families
from t2l_framework.plugins import manager
from tests.plugin_factory import make_plugin

EMBD, RANK, ALPHA = 32, 2, 4.0


@pytest.fixture
def gpt2_plugin(tmp_path, monkeypatch):
    """The example family installed as an entry-point plugin named 'gpt2'."""
    make_plugin(tmp_path / "site", "t2l-gpt2-family", "t2l_gpt2_family",
                "from examples.gpt2_family import t2l_register_base_models\n", entry_name="gpt2")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("T2L_PLUGINS", raising=False)
    yield manager.registry(reload=True)
    sys.modules.pop("t2l_gpt2_family", None)
    monkeypatch.undo()  # take the plugin off sys.path before the reload, or it stays registered
    manager.registry(reload=True)


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=EMBD, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def _random_weights(batch: int, seed: int = 1) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(batch, 2, RANK, EMBD, generator=g) * 0.3 for m in ("q_proj", "v_proj")}
    B = {m: torch.randn(batch, 2, EMBD, RANK, generator=g) * 0.3 for m in ("q_proj", "v_proj")}
    return LoraWeights(A, B, RANK, ALPHA)


def _merged(model, weights: LoraWeights, sample: int):
    """Reference: a copy of ``model`` whose c_attn weights ([in, out]) get the deltas of
    ``sample``'s adapter added to the q columns [0, E) and v columns [2E, 3E) only."""
    ref = copy.deepcopy(model)
    for i, block in enumerate(ref.transformer.h):
        w = block.attn.c_attn.weight  # [in, 3E]
        for target, cols in (("q_proj", slice(0, EMBD)), ("v_proj", slice(2 * EMBD, 3 * EMBD))):
            delta = weights.scaling * weights.B[target][sample, i] @ weights.A[target][sample, i]  # [out, in]
            w[:, cols] += delta.t()
    return ref


def _gpt2():
    """The family the assembly layer resolves for GPT-2 once the plugin is installed."""
    return find_family("gpt2", model_families())


def test_family_comes_from_the_plugin_registration(gpt2_plugin):
    assert gpt2_plugin.owners["base_models"]["gpt2"] == "gpt2"
    assert next(p for p in gpt2_plugin.plugins if p.name == "gpt2").registered == {"base_models": ["gpt2"]}
    assert _gpt2().fused_targets["q_proj"][0] == "c_attn"


def test_without_the_plugin_q_proj_is_not_found():
    manager.registry(reload=True)
    with pytest.raises(T2LError, match="no model family covers model_type 'gpt2'"):
        _gpt2()
    with pytest.raises(T2LError, match="'q_proj' not found in GPT2LMHeadModel.*c_attn"):
        inject_lora(_tiny_gpt2(), ["q_proj", "v_proj"])  # no family: no fused projections


def test_shapes_are_the_slices(gpt2_plugin):
    injection = inject_lora(_tiny_gpt2(), ["q_proj", "v_proj"], _gpt2())
    assert injection.shapes.n_layers == 2
    assert injection.shapes.shapes == {"q_proj": (EMBD, EMBD), "v_proj": (EMBD, EMBD)}
    assert injection.slices == {"q_proj": slice(0, EMBD), "v_proj": slice(2 * EMBD, 3 * EMBD)}
    assert injection.paths["q_proj"] == injection.paths["v_proj"] == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]


def test_slice_lora_on_c_attn_equals_manual_reference(gpt2_plugin):
    model = _tiny_gpt2()
    base_attn = model.transformer.h[0].attn.c_attn
    injection = inject_lora(model, ["q_proj", "v_proj"], _gpt2())
    weights = _random_weights(batch=2)
    x = torch.randn(2, 5, EMBD)
    base = base_attn(x)  # [2, 5, 3E]
    with injection.use(weights):
        out = model.transformer.h[0].attn.c_attn(x)
    s = weights.scaling
    for k in range(2):
        ref = base[k].clone()
        ref[:, :EMBD] += s * x[k] @ weights.A["q_proj"][k, 0].t() @ weights.B["q_proj"][k, 0].t()
        ref[:, 2 * EMBD:] += s * x[k] @ weights.A["v_proj"][k, 0].t() @ weights.B["v_proj"][k, 0].t()
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., EMBD:2 * EMBD], base[..., EMBD:2 * EMBD])  # k untouched
    assert not torch.allclose(out[..., :EMBD], base[..., :EMBD])


@pytest.mark.parametrize("batch", [1, 2])
def test_model_logits_equal_merged_weights(gpt2_plugin, batch):
    model = _tiny_gpt2()
    weights = _random_weights(batch)
    refs = [_merged(model, weights, k) for k in range(batch)]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    injection = inject_lora(model, ["q_proj", "v_proj"], _gpt2())
    with injection.use(weights):
        logits = model(ids).logits
    for row in range(2):
        ref = refs[row if batch == 2 else 0](ids[row:row + 1]).logits[0]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-4)
    # Outside the block, and after remove(), the model is the plain GPT-2 again.
    torch.testing.assert_close(model(ids).logits, _tiny_gpt2()(ids).logits)
    injection.remove()
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_gradients_reach_both_slices(gpt2_plugin):
    model = _tiny_gpt2()
    injection = inject_lora(model, ["q_proj", "v_proj"], _gpt2())
    weights = _random_weights(batch=2)
    for t in (weights.A, weights.B):
        for v in t.values():
            v.requires_grad_(True)
    with injection.use(weights):
        model(torch.randint(0, 64, (2, 6))).logits.square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for t in (weights.A, weights.B) for v in t.values())
    assert all(p.grad is None for p in model.parameters())  # the base stays frozen


def test_hypernetwork_builds_from_the_slice_shapes_and_starts_at_the_base_model(gpt2_plugin):
    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    base_logits = model(ids).logits
    injection = inject_lora(model, ["q_proj", "v_proj"], _gpt2())
    hypernet = HyperNetwork(injection.shapes, enc_dim=16, hypernet_cfg=HypernetConfig(latent_size=32, task_dim=16),
                            lora_cfg=LoraConfig(rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    weights = hypernet(torch.randn(3, 16))
    assert weights.A["q_proj"].shape == (3, 2, RANK, EMBD) and weights.B["v_proj"].shape == (3, 2, EMBD, RANK)
    assert isinstance(model.transformer.h[1].attn.c_attn, BatchedLoraLinear)
    with injection.use(weights):
        torch.testing.assert_close(model(ids).logits, base_logits)  # B == 0 at init


def test_peft_export_of_a_fused_slice_is_refused(gpt2_plugin, tmp_path):
    model = _tiny_gpt2()
    injection = inject_lora(model, ["q_proj", "v_proj"], _gpt2())
    with pytest.raises(T2LError, match="'q_proj'.*output slice of the fused layer 'transformer.h.0.attn.c_attn'.*PEFT"):
        export_peft_adapter(_random_weights(1), tmp_path / "a", "gpt2", paths=injection.paths)
    injection.remove()
    with pytest.raises(T2LError, match="fused layer"):
        export_peft_adapter(_random_weights(1), tmp_path / "b", "gpt2", model=model, family=_gpt2())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
