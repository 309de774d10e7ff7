"""The training stream at world size 2: each rank its own slice, resumes exact, noise per rank.

One spawn of two gloo processes on CPU serves every check (starting Python with torch is most of
the cost). For each of ``ddp``, ``fsdp_base`` and DeepSpeed ZeRO-2, every rank runs the tiny
world three times: 6 steps of 2 accumulated micro-batches straight through; the same recipe
stopped at step 3 (a checkpoint there); and that run resumed to step 6. Each rank records the
batches it trained on and the NEFTune noise it drew. The plan is the stream itself: batch i of
a data module with no trainer, i < 6 x 2 x 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from t2l_framework.assembly import fit
from t2l_framework.errors import T2LError
from t2l_framework.training.checkpoint_io import load_checkpoint_file
from tests.tiny_world import build_world

WORLD, STEPS, ACCUM, STOP = 2, 6, 2, 3
STRATEGIES = ["ddp", "fsdp_base", "deepspeed_stage_2"]
# dropout stays on (0.05 in trunk and LoRA input), NEFTune on (tiny world: alpha 5): both per rank
COMMON = [f"trainer.max_steps={STEPS}", f"trainer.accumulate_grad_batches={ACCUM}",
          f"training.checkpoint_every_n_steps={STOP}", "trainer.val_check_interval=1000", "trainer.limit_val_batches=1",
          "eval.val_generation_batches=0", "eval.final_report=false", "base_model.dtype=float32",
          "hypernet.dropout=0.05", "lora.dropout=0.05", f"trainer.devices={WORLD}"]


def fingerprint(batch: dict) -> str:
    h = hashlib.sha1()
    for key in ("input_ids", "labels", "desc_idx", "task_idx"):
        h.update(batch[key].cpu().numpy().tobytes())
    return h.hexdigest()


class Recorder(Callback):
    """The batches this rank trained on, in order; with ``stop_at``, stops the run at that step."""

    def __init__(self, stop_at: int = 0):
        self.seen: list[str] = []
        self.plan: list[str] = []
        self.stop_at = stop_at

    def on_train_start(self, trainer, pl_module):
        from t2l_framework.data.datamodule import T2LDataModule

        dm = trainer.datamodule  # the same stream with no trainer attached: what every batch i must be
        fresh = T2LDataModule(dm.cfg, dm.tokenizer, dm.format_prompt, dm.seed, dm.recipe_file, 10**3).train_dataset()
        self.plan = [fingerprint(fresh[i]) for i in range(STEPS * ACCUM * WORLD)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(fingerprint(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop_at and trainer.global_step == self.stop_at:
            trainer.should_stop = True


def _rank_main(rank: int, recipe: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      LOCAL_RANK=str(rank))  # LOCAL_RANK set: Lightning takes the processes as launched
    torch.set_num_threads(1)
    from t2l_framework.training import module

    noise: list[list[float]] = []
    draw = module.neftune_noise

    def recording(embeds, alpha, seq_len, seed):
        n = draw(embeds, alpha, seq_len, seed)
        noise.append(n.flatten()[:8].tolist())
        return n

    module.neftune_noise = recording
    facts = {}
    for strategy in STRATEGIES:
        runs = {}
        for kind, stop, resume in (("straight", 0, False), ("stopped", STOP, False), ("resumed", 0, True)):
            noise.clear()
            rec = Recorder(stop)
            name = f"{strategy}-{'straight' if kind == 'straight' else 'cut'}"
            run = fit(recipe, COMMON + [f"trainer.strategy={strategy}", f"training.run_name={name}"],
                      resume=resume, callbacks=[rec])
            runs[kind] = {"run": str(run), "seen": rec.seen, "plan": rec.plan, "noise": list(noise)}
        facts[strategy] = runs
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    pytest.importorskip("deepspeed")
    world = build_world(tmp_path_factory.mktemp("world"))
    out = tmp_path_factory.mktemp("ranks")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_ext")))
    torch.multiprocessing.spawn(_rank_main, args=(str(world["recipe"]), str(out), _free_port()), nprocs=WORLD)
    return {"world": world, "ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ranks_read_the_plan_once_straight_and_across_a_resume(two_ranks, strategy):
    ranks = [r[strategy] for r in two_ranks["ranks"]]
    plan = ranks[0]["straight"]["plan"]
    assert len(set(plan)) == len(plan) == STEPS * ACCUM * WORLD  # distinct batches: a repeat would show
    straight = [b for r in ranks for b in r["straight"]["seen"]]
    assert sorted(straight) == sorted(plan)  # the union is the plan, and nothing twice
    for rank, r in enumerate(ranks):  # micro-batch m of rank r is batch m x W + r
        assert r["straight"]["seen"] == plan[rank::WORLD]
        assert len(r["stopped"]["seen"]) == STOP * ACCUM
    cut = [b for r in ranks for kind in ("stopped", "resumed") for b in r[kind]["seen"]]
    assert sorted(cut) == sorted(plan)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_noise_differs_between_ranks_and_micro_batches_and_resumes_exactly(two_ranks, strategy):
    ranks = [r[strategy] for r in two_ranks["ranks"]]
    n0, n1 = (r["straight"]["noise"] for r in ranks)
    assert len(n0) == len(n1) == STEPS * ACCUM
    assert all(a != b for a, b in zip(n0, n1))  # the same micro-batch position on the two ranks
    assert all(n0[2 * s] != n0[2 * s + 1] for s in range(STEPS))  # two micro-batches of one step
    for r in ranks:  # the interrupted and the resumed run drew the uninterrupted run's noise
        assert r["stopped"]["noise"] + r["resumed"]["noise"] == r["straight"]["noise"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resumed_run_ends_with_the_uninterrupted_weights(two_ranks, strategy):
    runs = two_ranks["ranks"][0][strategy]
    a = load_file(Path(runs["straight"]["run"]) / "hypernet" / "hypernet.safetensors")
    b = load_file(Path(runs["resumed"]["run"]) / "hypernet" / "hypernet.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    status = json.loads((Path(runs["resumed"]["run"]) / "training_status.json").read_text())
    assert status["steps"] == STEPS and status["world_size"] == WORLD


def _is_pickle(path: Path) -> bool:
    head = path.read_bytes()[:4]
    return head[:1] == b"\x80" or head == b"PK\x03\x04"  # raw pickle, or torch.save's zip


def test_deepspeed_run_folder_holds_no_pickle_and_its_checkpoint_is_safetensors(two_ranks):
    run = Path(two_ranks["ranks"][0]["deepspeed_stage_2"]["resumed"]["run"])
    files = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in files if _is_pickle(p)]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", f"step{STEPS}.ckpt"]
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    opt = state["optimizer_states"][0]
    assert opt["zero_consolidated"] and set(opt["state"]) == {k for k in state["state_dict"] if k.startswith("generator.")}
    assert all(set(v) == {"exp_avg", "exp_avg_sq"} for v in opt["state"].values())
    assert state["global_step"] == STEPS


def test_resume_at_another_world_size_is_refused_in_one_line(two_ranks):
    runs = two_ranks["ranks"][0]["ddp"]
    ckpt_dir = Path(runs["resumed"]["run"]) / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    overrides = [o for o in COMMON if not o.startswith("trainer.devices")] + ["trainer.devices=1",
                                                                              "training.run_name=ddp-cut"]
    with pytest.raises(T2LError, match=r"written by a run on 2 process\(es\) and this run has 1 ") as info:
        fit(str(two_ranks["world"]["recipe"]), overrides, resume=True)
    assert "\n" not in str(info.value)
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before  # nothing written, nothing removed
