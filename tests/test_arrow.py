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


# --- the library and `t2l eval --adapters arrow=DIR` --------------------------------------------

@pytest.fixture(scope="module")
def arrow_world(tmp_path_factory):
    """The tiny world, a library of 3 random PEFT adapters for its model, and a 1-adapter library."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_world import build_world

    world = build_world(tmp_path_factory.mktemp("arrow_world"))
    model = AutoModelForCausalLM.from_pretrained(world["llm"], dtype=F32)
    weights = random_library_weights(model, 3, 2, seed=7)
    world["library"], world["single"] = world["root"] / "library", world["root"] / "single"
    for name, w in zip(("toy_0", "toy_1", "toy_2"), weights):
        export_peft_adapter(w, world["library"] / name, str(world["llm"]), model=model)
    export_peft_adapter(weights[1], world["single"] / "toy_1", str(world["llm"]), model=model)
    return world


def test_library_loads_each_adapter_with_its_own_scaling(arrow_world, tmp_path):
    lib = load_arrow_library(arrow_world["library"], top_k=2)
    assert lib.names == ["toy_0", "toy_1", "toy_2"] and sorted(lib.modules) == ["q_proj", "v_proj"] and lib.top_k == 2
    assert lib.prototypes["q_proj"].shape == (3, 2, 64) and lib.prototypes["v_proj"].shape == (3, 2, 64)
    from t2l_framework.lora.peft_io import import_peft_adapter

    for e, name in enumerate(lib.names):  # scaling folded into B: same delta W as PEFT's
        w = import_peft_adapter(arrow_world["library"] / name)
        want = w.scaling * w.B["v_proj"][0, 1] @ w.A["v_proj"][0, 1]
        assert torch.allclose(lib.experts.B["v_proj"][e, 1] @ lib.experts.A["v_proj"][e, 1], want, atol=1e-5)
    with pytest.raises(T2LError, match="holds no PEFT adapter folders"):
        load_arrow_library(tmp_path)


def _eval(world, out, *extra):
    from t2l_framework.cli import main

    return main(["eval", str(world["recipe"]), "--limit", "1", "--max-new-tokens", "4", "--code-timeout", "5",
                 "--no-cache", "--dtype", "float32", "-o", str(out), *extra])


def _logprobs(out, adapter, bench):
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return [r["prediction"]["logprobs"] for r in rows if r["adapter"] == adapter and r["benchmark"] == bench]


def test_eval_arrow_on_every_benchmark_and_sni_unseen(arrow_world, tmp_path, capsys):
    out = tmp_path / "all"
    assert _eval(arrow_world, out, "--benchmarks", "all", "--adapters", f"base,arrow={arrow_world['library']}",
                 "--protocol", "chat") == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["scores"]) == ["base", "arrow"] and results["adapters"]["arrow"]["kind"] == "arrow"
    assert "sni_unseen" in results["benchmarks"] and len(results["benchmarks"]) == 11
    assert set(results["scores"]["arrow"]) == set(results["benchmarks"])
    assert all(v["n"] >= 1 and len(v["per_description"]) == 1 for v in results["scores"]["arrow"].values())
    assert "| arrow |" in capsys.readouterr().out
    # the library is really applied: Arrow's option log-probabilities differ from the base model's
    assert _logprobs(out, "arrow", "arc_easy") != _logprobs(out, "base", "arc_easy")


def test_arrow_over_one_adapter_scores_as_that_adapter(arrow_world, tmp_path):
    """A one-expert library routes every token with weight 1: the same numbers as the PEFT folder."""
    out = tmp_path / "one"
    adapters = f"arrow={arrow_world['single']},peft={arrow_world['single'] / 'toy_1'}"
    assert _eval(arrow_world, out, "--benchmarks", "arc_easy,boolq", "--adapters", adapters, "--protocol", "chat",
                 "--arrow-top-k", "1") == 0
    for bench in ("arc_easy", "boolq"):
        got, want = _logprobs(out, "arrow", bench), _logprobs(out, "peft", bench)
        assert len(got) == 1 and got[0] == pytest.approx(want[0], abs=1e-4)


def test_recipe_library_is_a_default_condition_and_bad_specs_are_one_line(arrow_world, tmp_path, capsys):
    recipe = tmp_path / "with_library.yaml"
    recipe.write_text(arrow_world["recipe"].read_text() + f"  arrow_library: {arrow_world['library']}\n")
    world = dict(arrow_world, recipe=recipe)
    assert _eval(world, tmp_path / "d", "--benchmarks", "arc_easy") == 0
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert list(results["scores"]) == ["base", "base+description", "arrow"]
    assert results["adapters"]["arrow"]["path"] == str(arrow_world["library"])
    # top-k and temperature are part of the cached identity
    assert _eval(world, tmp_path / "e", "--benchmarks", "arc_easy", "--adapters", "arrow", "--arrow-top-k", "2",
                 "--arrow-temperature", "0.5") == 0
    again = json.loads((tmp_path / "e" / "results.json").read_text())
    assert again["adapters"]["arrow"]["identity"].startswith("arrow:k=2:t=0.5:")
    assert again["adapters"]["arrow"]["identity"] != results["adapters"]["arrow"]["identity"]
    capsys.readouterr()
    assert _eval(arrow_world, tmp_path / "f", "--benchmarks", "arc_easy", "--adapters", "arrow") == 1
    assert "arrow=LIBRARY_DIR" in capsys.readouterr().err
    assert _eval(arrow_world, tmp_path / "g", "--benchmarks", "arc_easy", "--adapters",
                 f"arrow={arrow_world['library']}", "--arrow-temperature", "0") == 1
    assert "--arrow-temperature must be > 0" in capsys.readouterr().err


def test_end_of_training_table_has_the_arrow_condition(arrow_world):
    from t2l_framework.assembly import fit

    run = fit(str(arrow_world["recipe"]), ["trainer.max_steps=1", "training.run_name=arrow_table",
                                           "eval.final_report=true", "eval.report_max_items=3",
                                           f"eval.arrow_library={arrow_world['library']}"])
    tables = json.loads((run / "report.json").read_text())["tables"]
    assert tables and all("arrow" in section and section["arrow"]["n"] == 3 for section in tables.values())
    assert "(h) Arrow routing over the LoRA library" in (run / "report.md").read_text()
