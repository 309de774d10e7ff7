"""Batched per-sample LoRA: equal to PEFT, per-sample in forward and generate, PEFT round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from t2l_framework.errors import T2LError
from t2l_framework.lora import (BatchedLoraLinear, LoraWeights, export_peft_adapter, import_peft_adapter,
                                inject_lora, module_paths)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def random_weights(shapes, batch: int, rank: int = 4, alpha: float = 8.0, seed: int = 0, scale: float = 0.3):
    """LoraWeights with both factors non-zero so the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(batch, shapes.n_layers, rank, i, generator=g) * scale for m, (i, o) in shapes.shapes.items()}
    B = {m: torch.randn(batch, shapes.n_layers, o, rank, generator=g) * scale for m, (i, o) in shapes.shapes.items()}
    return LoraWeights(A, B, rank, alpha)


def peft_model_with(model, weights: LoraWeights, targets, lora_dropout: float = 0.0):
    """PEFT's own LoRA model with the factors of ``weights`` (batch 1) copied in."""
    import peft

    paths = module_paths(model, targets)
    config = peft.LoraConfig(r=weights.rank, lora_alpha=weights.alpha, target_modules=targets,
                             lora_dropout=lora_dropout)
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    for t in targets:
        for i, path in enumerate(paths[t]):
            mod = pm.base_model.model.get_submodule(path)
            mod.lora_A["default"].weight.data.copy_(weights.A[t][0, i])
            mod.lora_B["default"].weight.data.copy_(weights.B[t][0, i])
    return pm


def ids(batch=3, seq=7, seed=1):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mistral"])
def test_logits_match_peft(family, request):
    model = request.getfixturevalue(family)()
    x = ids()
    injection = inject_lora(copy.deepcopy(model), TARGETS)
    w = random_weights(injection.shapes, batch=1)
    with torch.no_grad(), injection.use(w):
        ours = injection.model(x).logits
    ref = peft_model_with(model, w, TARGETS)(x).logits
    assert (ours - ref).abs().max() < 1e-5
    assert (ours - model(x).logits).abs().max() > 1e-3  # the adapter does something


def test_per_sample_forward_equals_separate_runs(tiny_llama):
    injection = inject_lora(tiny_llama(), TARGETS)
    w, x = random_weights(injection.shapes, batch=3), ids()
    with torch.no_grad():
        with injection.use(w):
            batched = injection.model(x).logits
        for i in range(3):
            with injection.use(w.select(i)):
                single = injection.model(x[i : i + 1]).logits
            assert (batched[i] - single[0]).abs().max() < 1e-5


def test_batch_one_weights_broadcast(tiny_llama):
    injection = inject_lora(tiny_llama(), TARGETS)
    w, x = random_weights(injection.shapes, batch=1), ids()
    with torch.no_grad():
        with injection.use(w):
            shared = injection.model(x).logits
        with injection.use(LoraWeights.cat([w, w, w])):
            repeated = injection.model(x).logits
    assert (shared - repeated).abs().max() < 1e-5


def test_lora_dropout_is_peft_lora_dropout(tiny_llama):
    """Dropout on the layer input before A, one mask per wrapped layer: PEFT's lora_dropout
    in training gives the same logits for the same random stream."""
    model = tiny_llama()
    x = ids()
    injection = inject_lora(copy.deepcopy(model), TARGETS)
    w = random_weights(injection.shapes, batch=1)
    pm = peft_model_with(model, w, TARGETS, lora_dropout=0.3)
    for mod in pm.modules():  # only PEFT's dropout in training mode: the base model stays in eval
        if isinstance(mod, torch.nn.Dropout):
            mod.train()
    with torch.no_grad():
        torch.manual_seed(7)
        theirs = pm(x).logits
        torch.manual_seed(7)
        with injection.use(w, dropout=0.3):
            ours = injection.model(x).logits
        with injection.use(w):
            plain = injection.model(x).logits
        torch.manual_seed(7)
        with injection.use(LoraWeights.cat([w, w, w]), dropout=0.3):  # the per-sample (bmm) path
            per_sample = injection.model(x).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert (per_sample - theirs).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the dropout did something


def test_no_dropout_costs_nothing_and_is_cleared(tiny_llama, monkeypatch):
    injection = inject_lora(tiny_llama(), TARGETS)
    w, x = random_weights(injection.shapes, batch=2), ids(batch=2)
    with torch.no_grad(), injection.use(w, dropout=0.5):
        injection.model(x)
    assert all(mod.dropout == 0.0 for mods in injection.layers.values() for mod in mods)

    def no_dropout(*args, **kwargs):
        raise AssertionError("dropout called with dropout=0")

    monkeypatch.setattr(torch.nn.functional, "dropout", no_dropout)
    with torch.no_grad(), injection.use(w):
        injection.model(x)
    with pytest.raises(AssertionError):  # an invariant: lora.dropout was checked with the recipe
        injection.set(w, dropout=1.0)


@pytest.mark.parametrize("gen_kwargs", [{}, {"num_beams": 2, "num_return_sequences": 2}])
def test_per_sample_generate_equals_separate_runs(tiny_mistral, gen_kwargs):
    injection = inject_lora(tiny_mistral(), TARGETS)
    w, x = random_weights(injection.shapes, batch=3, scale=0.6), ids(seq=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, **gen_kwargs)
    with torch.no_grad():
        with injection.use(w):
            batched = injection.model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        k = gen_kwargs.get("num_return_sequences", 1)
        for i in range(3):
            with injection.use(w.select(i)):
                single = injection.model.generate(x[i : i + 1], attention_mask=torch.ones_like(x[:1]), **kwargs)
            assert torch.equal(batched[i * k : (i + 1) * k], single)
        plain = injection.model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    assert not torch.equal(plain, batched)  # the adapters changed what is generated


def test_no_adapter_is_base_model_and_remove_restores(tiny_llama):
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        injection = inject_lora(model, TARGETS)
        assert isinstance(model.model.layers[0].self_attn.q_proj, BatchedLoraLinear)
        assert torch.equal(model(x).logits, base)
        with injection.use(random_weights(injection.shapes, batch=3)):
            model(x)
        assert torch.equal(model(x).logits, base)  # leaving the block clears the adapters
        injection.remove()
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(model(x).logits, base)


def test_gradients_reach_factors_not_base(tiny_llama):
    injection = inject_lora(tiny_llama(), TARGETS)
    w = random_weights(injection.shapes, batch=3)
    for t in w.A.values():
        t.requires_grad_(True)
    for t in w.B.values():
        t.requires_grad_(True)
    with injection.use(w):
        injection.model(ids()).logits.logsumexp(-1).mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in [*w.A.values(), *w.B.values()])
    assert all(p.grad is None and not p.requires_grad for p in injection.model.parameters())
    # Each sample's loss depends on its own adapter only: batched grads = per-sample grads.
    one = w.select(1)
    one = LoraWeights({m: a.detach().requires_grad_(True) for m, a in one.A.items()},
                      {m: b.detach().requires_grad_(True) for m, b in one.B.items()}, w.rank, w.alpha)
    with injection.use(one):
        injection.model(ids()[1:2]).logits.logsumexp(-1).mean().mul(1 / 3).backward()
    for m in TARGETS:
        assert torch.allclose(one.A[m].grad[0], w.A[m].grad[1], atol=1e-6)
        assert torch.allclose(one.B[m].grad[0], w.B[m].grad[1], atol=1e-6)


def test_factors_cast_to_input_dtype(tiny_llama):
    injection = inject_lora(tiny_llama(), TARGETS)
    w = random_weights(injection.shapes, batch=3)
    with torch.no_grad():
        with injection.use(w):
            ref = injection.model(ids()).logits
        with injection.use(w.to(torch.float64)):
            cast = injection.model(ids()).logits
    assert cast.dtype == torch.float32 and (cast - ref).abs().max() < 1e-5


def test_wrong_shapes_and_batch_are_clear_errors(tiny_llama):
    injection = inject_lora(tiny_llama(), ["q_proj"])
    w = random_weights(injection.shapes, batch=2)
    with pytest.raises(T2LError, match="'q_proj'.*the model needs A"):
        injection.set(LoraWeights({"q_proj": w.A["q_proj"][:, :, :, :10]}, w.B, w.rank, w.alpha))
    with pytest.raises(T2LError, match="lack target modules"):
        injection.set(LoraWeights({}, {}, 4, 8.0))
    with pytest.raises(T2LError, match="2 adapters but the input batch has 3"), injection.use(w):
        injection.model(ids())
    with pytest.raises(T2LError, match="already carries LoRA"):
        inject_lora(injection.model, ["q_proj"])


def test_export_loads_in_peft_with_same_logits_and_imports_back(tiny_llama, tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    injection = inject_lora(copy.deepcopy(model), TARGETS)
    w, x = random_weights(injection.shapes, batch=2), ids()
    one = w.select(1)
    out = export_peft_adapter(one, tmp_path / "adapter", "some/base-model", paths=injection.paths)
    config = (out / "adapter_config.json").read_text()
    assert '"base_model_name_or_path": "some/base-model"' in config and '"peft_type": "LORA"' in config
    assert not list(tmp_path.glob(".adapter.*"))  # the temporary folder is gone

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    with torch.no_grad(), injection.use(one):
        ours = injection.model(x).logits
        theirs = peft_model(x).logits
    assert (ours - theirs).abs().max() < 1e-5

    back = import_peft_adapter(out)
    assert (back.rank, back.alpha, sorted(back.modules)) == (4, 8.0, sorted(TARGETS))
    for m in TARGETS:
        assert torch.equal(back.A[m], one.A[m]) and torch.equal(back.B[m], one.B[m])
    # Paths from the model itself give the same folder contents.
    again = export_peft_adapter(one, tmp_path / "again", "some/base-model", model=model)
    assert torch.equal(import_peft_adapter(again).A["q_proj"], one.A["q_proj"])


def test_import_rejects_non_lora_folders(tmp_path):
    with pytest.raises(T2LError, match="not a PEFT LoRA folder"):
        import_peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(T2LError, match="'peft_type' is not LORA"):
        import_peft_adapter(tmp_path)


def _exported(tiny_llama, folder, rank=2):
    model = tiny_llama()
    injection = inject_lora(copy.deepcopy(model), ["q_proj", "v_proj"])
    return export_peft_adapter(random_weights(injection.shapes, batch=1, rank=rank), folder, "x",
                               paths=injection.paths)


def _config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, words", [
    ({"r": 1_000_000_000}, r"adapter_config.json: 'r': expected a positive integer up to 4096"),
    ({"r": 4}, r"adapter_model.safetensors: lora_A factors must be 2-D with adapter_config.json's rank 'r' on "
               r"dimension 0"),
    ({"r": "2"}, r"'r': expected a positive integer"),
    ({"lora_alpha": float("inf")}, r"'lora_alpha': expected a finite number > 0"),
    ({"lora_alpha": -1}, r"'lora_alpha': expected a finite number > 0"),
    ({"use_rslora": "yes"}, r"'use_rslora': expected true or false"),
    ({"target_modules": ["q_proj"]}, r"a LoRA factor is for a module that adapter_config.json's 'target_modules' "
                                     r"does not name"),
    ({"target_modules": [["q_proj"]]}, r"'target_modules': expected a list of module names"),
])
def test_import_checks_the_config_against_the_tensors_before_reading_them(tiny_llama, tmp_path, monkeypatch,
                                                                          changes, words):
    """r: 1e9 with rank-2 tensors was accepted and `t2l eval --adapters` then tried to allocate 512 GB."""
    from t2l_framework.lora import peft_io

    folder = _exported(tiny_llama, tmp_path / "adapter")
    _config(folder, **changes)
    monkeypatch.setattr(peft_io, "load_file", lambda *a, **k: pytest.fail("tensors read before the checks"))
    with pytest.raises(T2LError, match=words) as err:
        import_peft_adapter(folder)
    assert "1000000000" not in str(err.value) and "inf" not in str(err.value).replace("finite", "")


def test_import_refuses_factors_with_gaps_or_uneven_shapes(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _exported(tiny_llama, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    gap = {k.replace("layers.1.", "layers.999999999."): v for k, v in state.items()}
    save_file(gap, weights)
    with pytest.raises(T2LError, match=r"factors for layers 0, 1, ... without gaps"):
        import_peft_adapter(folder)
    uneven = dict(state)
    key = next(k for k in state if "layers.1." in k and "q_proj.lora_A" in k)
    uneven[key] = torch.zeros(2, 7)
    save_file(uneven, weights)
    with pytest.raises(T2LError, match=r"differ in shape between layers"):
        import_peft_adapter(folder)
    one_sided = {k: v for k, v in state.items() if not ("v_proj" in k and "lora_B" in k)}
    save_file(one_sided, weights)
    with pytest.raises(T2LError, match=r"do not all have lora_A and lora_B factors"):
        import_peft_adapter(folder)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(T2LError, match=r"not a readable safetensors file"):
        import_peft_adapter(folder)
    save_file(state, weights)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(T2LError, match=r"(nested too deeply|not readable as JSON|expected a JSON object)"):
        import_peft_adapter(folder)


def test_export_needs_batch_one(tiny_llama, tmp_path):
    model = tiny_llama()
    injection = inject_lora(model, ["q_proj"])
    with pytest.raises(T2LError, match="batch of 2"):
        export_peft_adapter(random_weights(injection.shapes, batch=2), tmp_path / "a", "x", model=model)
