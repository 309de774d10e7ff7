"""training.compile: the training step through torch.compile equals the eager step, step after step.

The compiled path must see each step's LoRA factors and each step's NEFTune noise, through
reused graphs (repeated shapes), recompiles (new shapes) and NEFTune switched off and on; the
sequence below is the one where, in a trial, a per-step hook closure inside the compiled region
was replayed stale. Backend ``eager`` traces with dynamo without generating code, which keeps
the test fast on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from t2l_framework.config import load_recipe
from t2l_framework.errors import T2LError
from t2l_framework.lora.batched import inject_lora
from t2l_framework.lora.weights import LoraWeights
from t2l_framework.training.module import T2LModule
from t2l_framework.training.sharding import check_sharded_recipe

# (batch, seq, NEFTune on): repeated shapes (a cached graph is reused), new shapes (a
# recompile, then dynamic shapes), NEFTune off in between.
STEPS = [(4, 10, True), (4, 10, True), (4, 12, True), (3, 9, True), (4, 10, False), (4, 14, True)]


def _weights(shapes, batch: int, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    A = {m: (torch.randn(batch, shapes.n_layers, 4, i, generator=g) * 0.3).requires_grad_() for m, (i, o) in shapes.shapes.items()}
    B = {m: (torch.randn(batch, shapes.n_layers, o, 4, generator=g) * 0.3).requires_grad_() for m, (i, o) in shapes.shapes.items()}
    return LoraWeights(A, B, 4, 8.0, True)


def _batch(batch: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_compiled_steps_equal_eager_steps_with_per_step_lora_and_neftune(tiny_llama, monkeypatch):
    model = tiny_llama()
    injection = inject_lora(model, ["q_proj", "v_proj"])
    common = ["lora.dropout=0.0", "training.neftune_alpha=5.0"]
    eager = T2LModule(load_recipe(overrides=common, check_files=False), torch.nn.Identity(), model, injection)
    compiled = T2LModule(load_recipe(overrides=[*common, "training.compile=true", "training.compile_backend=eager"],
                                     check_files=False), torch.nn.Identity(), model, injection)
    current = {"step": 0}
    monkeypatch.setattr(T2LModule, "global_step", property(lambda self: current["step"]))  # what the trainer advances
    for step, (batch, seq, neftune) in enumerate(STEPS):
        current["step"] = step  # a new NEFTune seed every step
        results = []
        for module in (eager, compiled):
            module.train(neftune)  # NEFTune applies in training steps only
            weights = _weights(injection.shapes, batch, seed=step)
            loss, _ = module.lm_loss(_batch(batch, seq, seed=step), weights, 0.0)
            loss.backward()
            results.append((loss.detach(), weights.A["q_proj"].grad, weights.B["v_proj"].grad))
        (le, ae, be), (lc, ac, bc) = results
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5, msg=f"loss, step {step}")
        torch.testing.assert_close(ac, ae, rtol=1e-4, atol=1e-6, msg=f"dA, step {step}")
        torch.testing.assert_close(bc, be, rtol=1e-4, atol=1e-6, msg=f"dB, step {step}")
    assert getattr(compiled, "_compiled_backbone", None) is not None  # the compiled path really ran
    # the compiled stack stays hidden like the base: a checkpoint holds none of its weights
    assert not any("embed_tokens" in k or "layers." in k for k in compiled.state_dict())


def test_compile_is_refused_with_a_sharded_base():
    cfg = load_recipe(overrides=["trainer.strategy=fsdp_base", "training.compile=true", "eval.final_report=false",
                                 "eval.val_generation_batches=0"], check_files=False)
    with pytest.raises(T2LError, match="training.compile=true with trainer.strategy=fsdp_base"):
        check_sharded_recipe(cfg)
