"""The frozen base sharded across ranks (``trainer.strategy: fsdp_base``): two gloo processes on
CPU train one step of the tiny world, and a 70B recipe's plan gives each of 8 ranks 1/8 of the base.

One spawn serves every two-rank check (starting two Python processes with torch is most of the
cost): each rank runs ``fit`` with the sharded base and records what it holds, its step-1 loss
and the synchronised hypernetwork gradients; it also shards a tied-embedding model by hand.
The single-process reference is the same recipe with 2 accumulated micro-batches: under DDP,
rank r's first batch is the stream's batch r, which is micro-batch r of the single process.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from t2l_framework.assembly import fit, load_recipe
from t2l_framework.errors import T2LError
from t2l_framework.training.checkpoint_io import load_checkpoint_file
from t2l_framework.training.sharding import (check_sharded_recipe, local_param_bytes, param_bytes,
                                             plan_rank_bytes, shard_frozen_base, shard_units)
from tests.tiny_world import build_world

WORLD = 2
# Dropout and NEFTune off: their draws are seeded per (step, micro-batch, rank), so only with them off
# do both ranks' losses have a single-process twin (tests/test_stream_world.py checks them per rank).
COMMON = ["trainer.max_steps=1", "hypernet.dropout=0", "lora.dropout=0", "training.neftune_alpha=0",
          "training.checkpoint_every_n_steps=1",
          "trainer.limit_val_batches=1", "trainer.val_check_interval=1", "eval.val_generation_batches=0", "eval.final_report=false"]


class Recorder(Callback):
    """Per-rank facts of a run: base bytes held, the loss of every micro-batch of step 1, and the
    generator's gradients as the optimizer sees them (after DDP's all-reduce)."""

    def __init__(self):
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] = {}
        self.held = self.full = self.planned = self.held_at_end = 0

    def on_train_start(self, trainer, pl_module):
        base = pl_module.base_model
        self.held, self.full = local_param_bytes(base), param_bytes(base)
        self.planned = plan_rank_bytes(base, trainer.world_size)[trainer.global_rank]

    def on_train_end(self, trainer, pl_module):
        self.held_at_end = local_param_bytes(pl_module.base_model)  # after the closing validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step <= 1:  # Lightning hands back the loss divided by the accumulation
            self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.generator.named_parameters()
                          if p.grad is not None}


def _tied_check(rank: int) -> dict:
    """Shard a tied-embedding tiny Llama by hand: bytes held after a step, and loss + LoRA
    gradients against the unsharded model (every rank has both, built from the same seed)."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    from t2l_framework.lora.batched import inject_lora
    from t2l_framework.lora.weights import LoraWeights

    def build():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).requires_grad_(False)
        injection = inject_lora(model, ["q_proj", "v_proj"], None)
        A = {m: torch.randn(2, 2, 4, 64, requires_grad=True) for m in ("q_proj", "v_proj")}
        B = {"q_proj": torch.randn(2, 2, 64, 4, requires_grad=True), "v_proj": torch.randn(2, 2, 32, 4, requires_grad=True)}
        return model, injection, LoraWeights(A, B, 4, 8.0, True), torch.randint(0, 96, (2, 9))

    def step(model, injection, weights, ids):
        with injection.use(weights):  # as T2LModule.lm_loss: backbone, then the output layer
            hidden = model.model(input_ids=ids).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.item(), torch.cat([t.grad.flatten() for d in (weights.A, weights.B) for t in d.values()])

    ref_loss, ref_grad = step(*build())
    model, injection, weights, ids = build()
    full = param_bytes(model)
    shard_frozen_base(model, init_device_mesh("cpu", (WORLD,)))
    model.to("cpu")  # what T2LModule does with its base at fit start, here after sharding
    loss, grad = step(model, injection, weights, ids)
    return {"held": local_param_bytes(model), "full": full, "loss": loss, "ref_loss": ref_loss,
            "grad_diff": (grad - ref_grad).abs().max().item(),
            "still_tied": model.lm_head.weight is model.model.embed_tokens.weight}


def _rank_main(rank: int, recipe: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      LOCAL_RANK=str(rank))  # LOCAL_RANK set: Lightning takes the processes as launched
    torch.set_num_threads(1)
    rec = Recorder()
    t0 = time.time()
    run = fit(recipe, COMMON + ["trainer.strategy=fsdp_base", f"trainer.devices={WORLD}", "training.run_name=sharded"],
              callbacks=[rec])
    seconds = time.time() - t0
    facts = {"run": str(run), "held": rec.held, "full": rec.full, "planned": rec.planned, "losses": rec.losses,
             "held_at_end": rec.held_at_end,
             "seconds": seconds, "tied": _tied_check(rank)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))
    save_file(rec.grads, str(Path(out, f"grads{rank}.safetensors")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' facts and the single-process reference run's."""
    world = build_world(tmp_path_factory.mktemp("world"))
    out = tmp_path_factory.mktemp("ranks")
    t0 = time.time()
    torch.multiprocessing.spawn(_rank_main, args=(str(world["recipe"]), str(out), _free_port()), nprocs=WORLD)
    spawn_s = time.time() - t0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    grads = [load_file(str(out / f"grads{r}.safetensors")) for r in range(WORLD)]
    rec = Recorder()
    single = fit(str(world["recipe"]), COMMON + ["trainer.accumulate_grad_batches=2", "training.run_name=single"],
                 callbacks=[rec])
    grad_diff = max((g[n] - rec.grads[n]).abs().max().item() for g in grads for n in rec.grads)
    print(f"\n[sharding] spawn {spawn_s:.1f} s; per rank: "
          + "; ".join(f"held {r['held']} of {r['full']} B ({r['held'] / r['full']:.1%}), step-1 loss {r['losses']}"
                      for r in ranks) + f"; single-process losses {rec.losses}; max |grad diff| {grad_diff:.2e}; "
          f"tied: {[r['tied'] for r in ranks]}")
    return {"ranks": ranks, "grads": grads, "single": rec, "single_run": single}


def test_each_rank_holds_at_most_55_percent_of_the_base(two_ranks):
    for r in two_ranks["ranks"]:
        assert r["held"] <= 0.55 * r["full"], r
        assert r["held"] == r["planned"]  # the meta-device plan predicts what FSDP2 really allocates
        # validation (no backward) leaves FSDP2 roots gathered; the strategy frees them after it
        assert r["held_at_end"] == r["held"]


def test_sharded_step_loss_and_gradients_match_one_process(two_ranks):
    single = two_ranks["single"]
    assert len(single.losses) == WORLD
    for rank, r in enumerate(two_ranks["ranks"]):
        assert len(r["losses"]) == 1
        assert abs(r["losses"][0] - single.losses[rank]) <= 1e-4, (rank, r["losses"], single.losses)
    assert set(two_ranks["grads"][0]) == set(single.grads) and single.grads
    for name, g in single.grads.items():
        for rank_grads in two_ranks["grads"]:  # DDP gives every rank the same averaged gradient
            torch.testing.assert_close(rank_grads[name], g, rtol=1e-4, atol=1e-6)


def test_sharded_run_checkpoint_holds_only_the_hypernetwork(two_ranks):
    run = Path(two_ranks["ranks"][0]["run"])
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]
    reference = load_checkpoint_file(two_ranks["single_run"] / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(state) == set(reference)
    assert all(k.startswith("generator.") for k in state), sorted(state)
    assert not any("embed_tokens" in k or "layers." in k or "lm_head" in k for k in state)
    assert (run / "hypernet" / "hypernet.safetensors").is_file()
    assert json.loads((run / "training_status.json").read_text())["steps"] == 1
    assert "val/loss" in (run / "logs" / "metrics.csv").read_text()  # validation ran on the sharded base


def test_tied_embeddings_shard_and_keep_loss_and_gradients(two_ranks):
    for r in two_ranks["ranks"]:
        t = r["tied"]
        assert t["held"] <= 0.55 * t["full"], t
        assert abs(t["loss"] - t["ref_loss"]) <= 1e-5 and t["grad_diff"] <= 1e-5, t
        assert t["still_tied"]  # after the step, the output layer reads the sharded input embeddings


# --- the sharding plan on the meta device ----------------------------------------------------

def test_70b_recipe_plan_gives_each_of_8_ranks_an_eighth_of_the_base():
    import transformers

    from tests.test_recipe_builds import HUB_CONFIGS

    cfg = load_recipe("llama3_1_70b_L_fsdp", check_files=False)
    assert cfg.trainer.strategy == "fsdp_base" and cfg.trainer.devices == 8
    cls_name, kwargs = HUB_CONFIGS[cfg.base_model.name_or_path]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs),
                                                              dtype=torch.bfloat16)
    full = param_bytes(model)
    assert 68e9 < full / 2 < 72e9  # a 70B-class base: 70.6B parameters
    plan = plan_rank_bytes(model, 8)
    assert len(plan) == 8
    for held in plan:
        assert full / 8 <= held <= full / 8 * 1.001, (held, full / 8)
    assert plan_rank_bytes(model, 1) == [full]
    print(f"\n[sharding] 70B plan: {full / 2**30:.1f} GiB bf16 base, {plan[0] / 2**30:.2f} GiB per rank of 8")


def test_units_cover_every_parameter_once(tiny_llama):
    model = tiny_llama()
    units = shard_units(model)
    assert [u.name for u in units] == ["model.layers.0", "model.layers.1", "model", "lm_head"]
    ids = [id(p) for u in units for p in u.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert plan_rank_bytes(model, 2)[0] == sum(
        -(-p.shape[0] // 2) * (p.numel() // p.shape[0]) * 4 for p in model.parameters())


def test_a_parameter_outside_the_units_is_named(tiny_llama):
    model = tiny_llama()
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(T2LError, match="'extra.weight'"):
        shard_units(model)


def test_a_trainable_base_parameter_is_refused(tiny_llama):
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(T2LError, match="'model.norm.weight' requires grad"):
        shard_frozen_base(model, mesh=None)


@pytest.mark.parametrize("override, key", [
    ("eval.val_generation_batches=1", "eval.val_generation_batches=1"),
    ("eval.final_report=true", "eval.final_report=true"),
    ("training.mode=recon", "training.mode=recon"),
])
def test_settings_that_would_hang_ranks_are_refused(override, key):
    cfg = load_recipe("llama3_1_70b_L_fsdp", [override], check_files=False)
    with pytest.raises(T2LError, match=key.replace(".", r"\.")):
        check_sharded_recipe(cfg)


def test_shipped_70b_recipe_passes_the_check():
    check_sharded_recipe(load_recipe("llama3_1_70b_L_fsdp", check_files=False))


def test_strategy_is_built_for_cpu_with_gloo():
    from lightning.pytorch.strategies import DDPStrategy

    from t2l_framework.training.strategies import build_strategy

    strategy = build_strategy("fsdp_base", "cpu", "32-true")
    assert isinstance(strategy, DDPStrategy) and strategy.strategy_name == "fsdp_base"
    assert strategy._process_group_backend == "gloo"
