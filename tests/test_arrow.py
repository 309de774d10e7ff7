"""Arrow routing over a LoRA library: the vectorised layer against a direct, looped statement of
the algorithm (full delta W, torch.linalg.svd of it, one token and one expert at a time), the
prototypes, top-k, temperature, the plain-LoRA special case, and `t2l eval --adapters arrow=DIR`."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from t2l_framework.errors import T2LError
from t2l_framework.lora.arrow import ArrowLibrary, arrow_prototypes, arrow_routing, load_arrow_library
from t2l_framework.lora.batched import BatchedLoraLinear, inject_lora
from t2l_framework.lora.peft_io import export_peft_adapter
from t2l_framework.lora.weights import LoraWeights

F32 = torch.float32


# --- the direct statement ----------------------------------------------------------------------

def looped_arrow(x: torch.Tensor, base: nn.Linear, experts: list[tuple[torch.Tensor, torch.Tensor, float]],
                 top_k: int, temperature: float) -> torch.Tensor:
    """x: [n, seq, in]; experts: (A [r, in], B [out, r], scaling). Token by token, expert by expert."""
    deltas = [s * B @ A for A, B, s in experts]  # full [out, in]
    protos = [torch.linalg.svd(d).Vh[0] for d in deltas]  # top right-singular vector
    out = base(x).clone()
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            tok = x[i, t]
            logits = [abs(float(tok @ p)) / temperature for p in protos]
            k = len(experts) if top_k <= 0 or top_k >= len(experts) else top_k
            chosen = sorted(range(len(experts)), key=lambda e: -logits[e])[:k]
            z = sum(math.exp(logits[e]) for e in chosen)
            for e in chosen:
                out[i, t] += math.exp(logits[e]) / z * (deltas[e] @ tok)
    return out


def random_experts(n: int, rank: int, fan_in: int, fan_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, rank, generator=g) * 0.3, 0.5 + e)
            for e in range(n)]


def library_of(experts, top_k=-1, temperature=1.0, module="proj") -> ArrowLibrary:
    """The experts of one layer as an ArrowLibrary with one module and one layer."""
    stacked = LoraWeights({module: torch.stack([A for A, _, _ in experts])[:, None]},
                          {module: torch.stack([B * s for _, B, s in experts])[:, None]},
                          rank=experts[0][0].shape[0], alpha=float(experts[0][0].shape[0]))
    return ArrowLibrary.from_weights([f"e{i}" for i in range(len(experts))], stacked, top_k, temperature)


def arrow_layer(base: nn.Linear, lib: ArrowLibrary, module="proj") -> BatchedLoraLinear:
    layer = BatchedLoraLinear(base)
    layer.set_experts(lib.experts.A[module][:, 0], lib.experts.B[module][:, 0], lib.prototypes[module][:, 0],
                      lib.top_k, lib.temperature)
    return layer


# --- math --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,fan_in,fan_out", [(4, 12, 10), (3, 5, 4), (6, 5, 4)])
def test_prototype_is_the_top_right_singular_vector_of_the_full_delta(rank, fan_in, fan_out):
    experts = random_experts(5, rank, fan_in, fan_out)
    A = torch.stack([a for a, _, _ in experts])
    B = torch.stack([b * s for _, b, s in experts])
    protos = arrow_prototypes(A, B)  # [E, in]
    assert protos.shape == (5, fan_in)
    for e, (a, b, s) in enumerate(experts):
        v = torch.linalg.svd(s * b @ a).Vh[0]
        assert abs(float(protos[e] @ v)) == pytest.approx(1.0, abs=1e-5)  # same direction, sign arbitrary
        assert float(protos[e].norm()) == pytest.approx(1.0, abs=1e-5)


def test_routing_masks_outside_the_top_k_and_softmaxes_the_rest():
    g = torch.Generator().manual_seed(1)
    x, protos = torch.randn(7, 6, generator=g), torch.randn(6, 4, generator=g)
    logits = (x @ protos).abs()
    w = arrow_routing(x, protos, top_k=2)
    assert ((w > 0).sum(-1) == 2).all()
    top = logits.topk(2, dim=-1)
    assert torch.equal(torch.sort((w > 0).nonzero()[:, 1].view(7, 2), -1).values, torch.sort(top.indices, -1).values)
    assert torch.allclose(w.gather(-1, top.indices), top.values.softmax(-1), atol=1e-6)
    # k <= 0 and k >= E both mean every expert
    assert torch.allclose(arrow_routing(x, protos, top_k=-1), logits.softmax(-1), atol=1e-6)
    assert torch.allclose(arrow_routing(x, protos, top_k=4), logits.softmax(-1), atol=1e-6)


def test_temperature_divides_the_logits():
    g = torch.Generator().manual_seed(2)
    x, protos = torch.randn(5, 6, generator=g), torch.randn(6, 3, generator=g)
    logits = (x @ protos).abs()
    for t in (0.25, 1.0, 4.0):
        assert torch.allclose(arrow_routing(x, protos, temperature=t), (logits / t).softmax(-1), atol=1e-6)
    sharp, flat = arrow_routing(x, protos, temperature=0.1), arrow_routing(x, protos, temperature=10.0)
    assert (sharp.max(-1).values > flat.max(-1).values).all()
    with pytest.raises(T2LError, match="temperature"):
        library_of(random_experts(2, 2, 6, 5), temperature=0.0)


@pytest.mark.parametrize("top_k,temperature", [(-1, 1.0), (2, 1.0), (1, 0.5), (3, 3.0)])
def test_layer_equals_the_looped_statement(top_k, temperature):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(F32)
    experts = random_experts(4, 3, 12, 10, seed=3)
    layer = arrow_layer(base, library_of(experts, top_k, temperature))
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        got, want = layer(x), looped_arrow(x, base, experts, top_k, temperature)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, base(x), atol=1e-3)  # the experts really contribute


def test_one_expert_with_k_1_is_plain_lora():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    (A, B, s), = random_experts(1, 3, 12, 10, seed=4)
    arrow = arrow_layer(base, library_of([(A, B, s)], top_k=1))
    plain = BatchedLoraLinear(base)
    plain.set_factors(A[None], B[None], s)
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        assert torch.allclose(arrow(x), plain(x), atol=1e-5)
        assert torch.allclose(plain(x), base(x) + s * x @ A.T @ B.T, atol=1e-5)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(F32).eval()


class LoopedArrowLinear(nn.Module):
    def __init__(self, base, experts, top_k, temperature):
        super().__init__()
        self.base, self.experts, self.top_k, self.temperature = base, experts, top_k, temperature

    def forward(self, x):
        return looped_arrow(x, self.base, self.experts, self.top_k, self.temperature)


def random_library_weights(model, n: int, rank: int, seed: int) -> list[LoraWeights]:
    """n random adapters (batch 1) for q_proj and v_proj of ``model``; different alphas."""
    g = torch.Generator().manual_seed(seed)
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    kv = model.config.num_key_value_heads * (hidden // model.config.num_attention_heads)
    out = []
    for e in range(n):
        A = {m: torch.randn(1, n_layers, rank, hidden, generator=g) * 0.3 for m in ("q_proj", "v_proj")}
        B = {m: torch.randn(1, n_layers, o, rank, generator=g) * 0.3 for m, o in (("q_proj", hidden), ("v_proj", kv))}
        out.append(LoraWeights(A, B, rank, float(2 + e), use_rslora=bool(e % 2)))
    return out


def test_injected_model_equals_the_looped_statement_in_every_layer():
    """Whole model: the injection's Arrow mode against every q/v projection replaced by the loop."""
    model = tiny_llama()
    adapters = random_library_weights(model, 3, 2, seed=5)
    lib = ArrowLibrary.from_weights(["a", "b", "c"], LoraWeights.cat([w.conform(
        inject_lora(copy.deepcopy(model), ["q_proj", "v_proj"]).shapes, 2) for w in adapters]), top_k=2)
    reference = copy.deepcopy(model)
    for i, layer in enumerate(reference.model.layers):
        for m in ("q_proj", "v_proj"):
            experts = [(w.A[m][0, i], w.B[m][0, i], w.scaling) for w in adapters]
            setattr(layer.self_attn, m, LoopedArrowLinear(getattr(layer.self_attn, m), experts, 2, 1.0))
    injection = inject_lora(model, ["q_proj", "v_proj"])
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        with injection.use_arrow(lib):
            got = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3)
    assert torch.equal(after, plain)  # leaving the block restores the base model
