"""`t2l fit` end to end on a tiny offline world: SFT, recon and lora modes, resume, DeepSpeed."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from t2l_framework.assembly import load_recipe
from t2l_framework.config import recipes_dir
from t2l_framework.errors import T2LError
from t2l_framework.training.checkpoint_io import load_checkpoint_file
from t2l_framework.assembly import fit
from t2l_framework.training.run import TrainingInterrupted, latest_checkpoint
from tests.tiny_world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def _metrics(run: Path) -> list[dict]:
    with open(run / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_sft_lowers_the_loss_and_writes_a_run_folder(world):
    run = fit(str(world["recipe"]), ["trainer.max_steps=24", "trainer.val_check_interval=6",
                                     "training.run_name=sft", "eval.final_report=true"])
    val = _series(_metrics(run), "val/loss")
    train = _series(_metrics(run), "train/ce")
    assert len(val) == 4 and val[-1] < val[0] * 0.85, val
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4
    rouge = _series(_metrics(run), "val/rougeL")
    assert len(rouge) == 4 and all(0.0 <= r <= 1.0 for r in rouge)
    assert (run / "recipe.yaml").is_file() and (run / "hypernet" / "hypernet.safetensors").is_file()
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 24
    # Only the hypernetwork is checkpointed: no base-model or encoder weights.
    assert ckpt["state_dict"] and all(k.startswith("generator.") for k in ckpt["state_dict"])
    report = (run / "report.md").read_text()
    assert "(c) T2L, held-out description" in report and "(d) T2L, another task's description" in report
    assert "| (c) T2L minus |" in report


def test_lora_mode_writes_a_peft_folder_that_peft_loads(world):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = fit(str(world["recipe"]), ["training.mode=lora", "trainer.max_steps=6", "training.run_name=lora"])
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["llm"]), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not PEFT's zero init


def test_recon_mode_lowers_its_loss(world, tmp_path):
    from t2l_framework.lora.peft_io import export_peft_adapter
    from t2l_framework.lora.weights import LoraWeights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["llm"])
    library = tmp_path / "library"
    g = torch.Generator().manual_seed(0)
    shared_A = {m: torch.randn(1, 2, 2, 64, generator=g) / 8 for m in ("q_proj", "v_proj")}  # ~ PEFT's A scale
    shared_B = {"q_proj": torch.randn(1, 2, 64, 2, generator=g) / 8, "v_proj": torch.randn(1, 2, 32, 2, generator=g) / 8}
    for k, task in enumerate(["toy_0", "toy_1", "toy_2", "toy_3"]):  # task LoRAs share most of their structure
        A = {m: a + torch.randn(a.shape, generator=g) / 40 for m, a in shared_A.items()}
        B = {m: b + torch.randn(b.shape, generator=g) / 40 for m, b in shared_B.items()}
        export_peft_adapter(LoraWeights(A, B, 2, 4.0, use_rslora=True), library / task, str(world["llm"]), model=model)
    common = ["training.mode=recon", f"data.lora_library={library}", "trainer.val_check_interval=15",
              "training.lr=1e-2"]
    for loss in ("delta_w", "factors"):
        run = fit(str(world["recipe"]), common + [f"training.recon_loss={loss}", "trainer.max_steps=30",
                                                  f"training.run_name=recon_{loss}"])
        train = _series(_metrics(run), "train/loss")
        assert len(_series(_metrics(run), "val/loss")) == 2
        assert sum(train[-4:]) / 4 < 0.6 * sum(train[:4]) / 4, (loss, train)
        assert (run / "hypernet" / "hypernet.safetensors").is_file()
    # A library made for another scaling is refused before training, naming the adapter file.
    with pytest.raises(T2LError, match=r"toy_0/adapter_config.json has r=2, lora_alpha=4, use_rslora=true "
                                       r"\(scaling 2.828\), but the recipe's lora section has rank=2, alpha=4, "
                                       r"use_rslora=false \(scaling 2\)"):
        fit(str(world["recipe"]), common + ["lora.use_rslora=false", "training.run_name=recon_bad"])


class _SignalAt(Callback):
    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_then_resume_equals_an_uninterrupted_run(world):
    common = ["trainer.max_steps=8", "trainer.val_check_interval=100"]
    straight = fit(str(world["recipe"]), common + ["training.run_name=straight"])
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM at step 3; checkpoint .*interrupted.ckpt written: "
                                                  "continue with --resume") as info:
        fit(str(world["recipe"]), common + ["training.run_name=killed"], callbacks=[_SignalAt(3)])
    assert info.value.exit_code == 143
    ckpt_dir = straight.parent / "killed" / "checkpoints"
    interrupted = latest_checkpoint(ckpt_dir)
    assert load_checkpoint_file(interrupted)["global_step"] == 3
    with pytest.raises(T2LError, match="--resume"):
        fit(str(world["recipe"]), common + ["training.run_name=killed"])
    resumed = fit(str(world["recipe"]), common + ["training.run_name=killed"], resume=True)
    a = load_file(straight / "hypernet" / "hypernet.safetensors")
    b = load_file(resumed / "hypernet" / "hypernet.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    steps = [load_checkpoint_file(latest_checkpoint(d / "checkpoints"))["global_step"] for d in (straight, resumed)]
    assert steps == [8, 8]
    # no pile-up: the same files as the uninterrupted run (no last-v1.ckpt, no stale interrupted.ckpt)
    names = lambda run: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert names(resumed) == names(straight) == ["last.ckpt", "step8.ckpt"]


@pytest.fixture
def interactive_sigint():
    """Ctrl-C as in a terminal: Python's KeyboardInterrupt handler, whatever the suite inherited.

    A process started in the background without job control (`cmd &` in a script, as CI may run
    the suite) inherits SIGINT ignored, and Lightning leaves it ignored after handling a
    KeyboardInterrupt; the previous handler is restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_t2l_fit_interrupted_exits_non_zero_after_its_checkpoint(world, monkeypatch, capsys, interactive_sigint,
                                                                 signum, code, name):
    """`make` and scripts must not take an interrupted run for a finished one (Lightning exits 0 / 1)."""
    import t2l_framework.assembly as assembly
    from t2l_framework.cli import main

    real_fit = assembly.fit
    monkeypatch.setattr(assembly, "fit", lambda *a, **k: real_fit(*a, **k, callbacks=[_SignalAt(2, signum)]))
    run_name = f"signal{code}"
    status = main(["fit", str(world["recipe"]), "trainer.max_steps=6", "trainer.val_check_interval=100",
                   f"training.run_name={run_name}"])
    err = capsys.readouterr().err
    assert status == code, err[-2000:]
    assert f"error: stopped by {name} at step 2" in err and "continue with --resume" in err
    saved = world["root"] / "runs" / run_name / "checkpoints" / "interrupted.ckpt"
    assert load_checkpoint_file(saved)["global_step"] == 2
    assert not (world["root"] / "runs" / run_name / "hypernet").exists()  # no result from a cut-short run


def test_torn_first_checkpoint_is_cleaned_and_resume_starts_from_scratch(world, capsys):
    """A kill during the very first checkpoint write leaves only a temporary file behind."""
    common = ["trainer.max_steps=2", "trainer.val_check_interval=100", "training.run_name=torn"]
    ckpt_dir = world["root"] / "runs" / "torn" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torn = [ckpt_dir / ".step2.ckpt.k3j_x9a2", ckpt_dir / ".last.ckpt.0a1b2c3d.partial"]
    for path in torn:
        path.write_bytes(b"\x00" * 100)  # half a safetensors header
    keep = ckpt_dir / "notes.txt"  # not ours to delete
    keep.write_text("mine")
    run = fit(str(world["recipe"]), common, resume=True)
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "starting from step 0" in err
    assert all(not p.exists() for p in torn) and keep.exists()
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    # and a plain run in a folder holding only torn files is not refused as "already has checkpoints"
    keep.unlink()
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    torn[0].write_bytes(b"\x00" * 100)
    assert fit(str(world["recipe"]), common) == run and not torn[0].exists()


def test_save_leaves_no_temp_file_when_the_write_fails(tmp_path, monkeypatch):
    import t2l_framework.training.checkpoint_io as cio

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cio, "save_file", dies)
    with pytest.raises(OSError):
        cio.save_checkpoint_file({"global_step": 1, "w": torch.ones(2)}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_are_safetensors_without_pickle(world):
    run = fit(str(world["recipe"]), ["trainer.max_steps=4", "training.run_name=st", "trainer.val_check_interval=100"])
    raw = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert not raw.startswith(b"PK") and b"t2l_checkpoint" in raw[:100000]  # not a torch zip/pickle


DEEPSPEED_RECIPES = [p for p in sorted(recipes_dir().glob("*.yaml"))
                     if load_recipe(p, check_files=False).trainer.strategy.startswith("deepspeed")]


def test_deepspeed_recipes_are_shipped():
    assert len(DEEPSPEED_RECIPES) >= 2


@pytest.mark.parametrize("path", DEEPSPEED_RECIPES, ids=[p.stem for p in DEEPSPEED_RECIPES])
def test_each_deepspeed_recipe_builds_its_strategy(path):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from t2l_framework.training.strategies import DEEPSPEED_STRATEGIES, build_strategy

    cfg = load_recipe(path, check_files=False)
    stage, offload = DEEPSPEED_STRATEGIES[cfg.trainer.strategy]
    strategy = build_strategy(cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.precision)
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload
    assert cfg.trainer.precision == "bf16-mixed"


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    import builtins

    from t2l_framework.training.strategies import build_strategy

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "deepspeed":
            raise ImportError("no deepspeed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(T2LError, match=r"pip install 't2l-framework\[deepspeed\]'"):
        build_strategy("deepspeed_stage_2", "cpu", "32-true")


def test_deepspeed_zero2_fits_on_cpu(world, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext")))
    monkeypatch.setenv("MASTER_PORT", "29517")
    run = fit(str(world["recipe"]), ["trainer.strategy=deepspeed_stage_2", "trainer.max_steps=2",
                                     "trainer.val_check_interval=100", "training.run_name=ds"])
    assert (run / "hypernet" / "hypernet.safetensors").is_file()
    assert _series(_metrics(run), "train/ce")
