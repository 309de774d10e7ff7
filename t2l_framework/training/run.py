"""`t2l fit`: build everything a recipe names, train with Lightning, write the run folder.

Run folder (``training.output_dir/run_name``): ``recipe.yaml`` (resolved), ``logs/``
(CSV metrics), ``tb/`` (TensorBoard), ``checkpoints/`` (safetensors, atomic; ``last.ckpt``
every ``checkpoint_every_n_steps`` and ``interrupted.ckpt`` on Ctrl-C / SIGTERM), and the
result: ``hypernet/`` (``save_pretrained``) or ``adapter/`` (PEFT, lora mode), plus
``report.md`` / ``report.json`` when the recipe asks for the end-of-training table, and
``training_status.json`` (steps done of ``max_steps``, examples, wall time, cut short or not).
"""

from __future__ import annotations

import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from t2l_framework.config import find_recipe, load_recipe, resolve_path
from t2l_framework.errors import T2LError
from t2l_framework.training.budget import TrainingStatus
from t2l_framework.training.budget import record as record_status


def planned_device(accelerator: str) -> str:
    """The device type the Trainer will use for ``trainer.accelerator`` (decides ``dtype: auto``)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def say(msg: str) -> None:
    print(f"[t2l] {msg}", file=sys.stderr, flush=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint with the highest global step (periodic or written on interruption)."""
    from t2l_framework.training.checkpoint_io import checkpoint_step

    best, best_step = None, -1
    for p in ckpt_dir.glob("*.ckpt"):
        try:
            # DeepSpeed writes checkpoint folders (all runs of one strategy): newest wins there.
            step = checkpoint_step(p) if p.is_file() else int(p.stat().st_mtime)
        except Exception:  # noqa: BLE001 - a torn file is skipped, not fatal
            continue
        if step > best_step:
            best, best_step = p, step
    return best


def run_folder(cfg, recipe_file: Path) -> Path:
    name = cfg.training.run_name or recipe_file.stem
    return Path(cfg.training.output_dir) / name


def _trainer(cfg, run_dir: Path, extra_callbacks: list):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from t2l_framework.training.checkpoint_io import SafetensorsCheckpointIO
    from t2l_framework.training.strategies import DEEPSPEED_STRATEGIES, build_strategy

    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    ckpt_dir = run_dir / "checkpoints"
    strategy = build_strategy(t.pop("strategy"), t["accelerator"], t["precision"])
    deepspeed = cfg.trainer.strategy in DEEPSPEED_STRATEGIES
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=cfg.training.checkpoint_every_n_steps,
                        save_last=True, save_top_k=1, monitor=None, auto_insert_metric_name=False),
        OnExceptionCheckpoint(dirpath=ckpt_dir, filename="interrupted"),
        LearningRateMonitor(logging_interval="step"),
        *extra_callbacks,
    ]
    loggers = [CSVLogger(run_dir, name="", version="logs")]
    try:
        loggers.append(TensorBoardLogger(run_dir, name="", version="tb"))
    except ModuleNotFoundError:
        say("tensorboard is not installed; logging to CSV only")
    if t.get("val_check_interval") and t["val_check_interval"] > t["max_steps"] * t["accumulate_grad_batches"]:
        t["val_check_interval"] = None  # a short run validates once, at the end
    if deepspeed:
        t.pop("gradient_clip_val", None)  # DeepSpeed clips inside its engine
    return L.Trainer(
        **t, strategy=strategy, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir),
        plugins=None if deepspeed else [SafetensorsCheckpointIO()], check_val_every_n_epoch=None,
        num_sanity_val_steps=0, max_epochs=-1,
    )


def build_components(cfg, recipe_file: Path | None):
    """Base model + injection, data module, embeddings and the generator for the recipe's mode."""
    from t2l_framework.encoders import build_encoder
    from t2l_framework.encoders.cache import EmbeddingCache
    from t2l_framework.hypernet.hypernetwork import HyperNetwork
    from t2l_framework.training.module import LearnedLora

    mode = cfg.training.mode
    total = int(cfg.trainer.max_steps) * int(cfg.trainer.accumulate_grad_batches) + 1
    base = injection = None
    if mode == "recon":
        from t2l_framework.training.recon import ReconDataModule, library_shapes

        dm = ReconDataModule(cfg.data, int(cfg.training.seed), recipe_file, total)
        shapes = library_shapes(dm.targets)
    else:
        from t2l_framework.data.datamodule import T2LDataModule
        from t2l_framework.llm.loading import load_base_model
        from t2l_framework.lora.batched import inject_lora

        t0 = time.time()
        say(f"loading base model {cfg.base_model.name_or_path} ...")
        base = load_base_model(cfg.base_model, say=say, runs_on=planned_device(cfg.trainer.accelerator))
        say(f"base model loaded in {time.time() - t0:.1f} s")
        injection = inject_lora(base.model, list(cfg.lora.target_modules))
        shapes = injection.shapes
        fmt = partial(base.family.format_prompt, base.tokenizer, chat_template=bool(cfg.base_model.chat_template))
        dm = T2LDataModule(cfg.data, base.tokenizer, lambda user, system="": fmt(user, system),
                           int(cfg.training.seed), recipe_file, total)
        dm.setup()
        say(f"{len(dm.train_task_ids)} training tasks, {len(dm.descriptions)} descriptions")
    embeddings = encoder = None
    if mode in ("sft", "recon"):
        t0 = time.time()
        encoder = build_encoder(cfg.encoder)
        cache_dir = Path(cfg.training.output_dir) / ".embedding_cache"
        embeddings = EmbeddingCache(encoder, dm.descriptions, cache_dir).embeddings
        say(f"embedded {len(dm.descriptions)} descriptions in {time.time() - t0:.1f} s")
        generator = HyperNetwork.from_recipe(cfg, shapes, embeddings.shape[1])
    else:
        generator = LearnedLora(shapes, int(cfg.lora.rank), float(cfg.lora.alpha), bool(cfg.lora.use_rslora))
    n_params = sum(p.numel() for p in generator.parameters() if p.requires_grad)
    say(f"{type(generator).__name__}: {n_params / 1e6:.2f}M trainable parameters")
    return base, injection, dm, embeddings, encoder, generator


def fit(recipe: str, overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False,
        callbacks: list | None = None) -> Path:
    import lightning as L

    from t2l_framework.training.module import T2LModule

    cfg = load_recipe(recipe, overrides)
    recipe_file = find_recipe(recipe)
    run_dir = run_folder(cfg, recipe_file)
    ckpt_dir = run_dir / "checkpoints"
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(ckpt_dir)
        if ckpt is None:
            raise T2LError(f"--resume: no checkpoint in {ckpt_dir}; start the run without --resume")
        say(f"resuming from {ckpt}")
    elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        if not overwrite:
            raise T2LError(f"run folder {run_dir} already has checkpoints; pass --resume to continue it, "
                           f"--overwrite to start again, or training.run_name=NAME for a new run")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(OmegaConf.to_yaml(cfg))
    torch.set_float32_matmul_precision("high")
    L.seed_everything(int(cfg.training.seed), workers=True, verbose=False)

    base, injection, dm, embeddings, encoder, generator = build_components(cfg, recipe_file)
    recon_targets = (dm.targets.A, dm.targets.B) if cfg.training.mode == "recon" else None
    module = T2LModule(cfg, generator, base.model if base else None, injection, embeddings, recon_targets,
                       tokenizer=base.tokenizer if base else None)
    trainer = _trainer(cfg, run_dir, list(callbacks or []))
    previous = TrainingStatus.load(run_dir) if ckpt else None
    t0 = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    say(f"trained to step {trainer.global_step} in {time.time() - t0:.0f} s")
    record_status(trainer, cfg, run_dir, time.time() - t0, previous)
    save_result(cfg, run_dir, generator, injection)
    if cfg.training.mode != "recon" and cfg.eval.final_report:
        from t2l_framework.training.final_report import final_report

        final_report(cfg, run_dir, base, injection, dm, embeddings, generator, recipe_file)
    say(f"run folder: {run_dir}")
    return run_dir


def save_result(cfg, run_dir: Path, generator, injection) -> Path:
    """hypernet/ (save_pretrained) for sft/recon, adapter/ (PEFT folder) for lora mode."""
    if cfg.training.mode == "lora":
        from t2l_framework.lora.peft_io import export_peft_adapter

        out = run_dir / "adapter"
        weights = generator().to("cpu")
        weights = weights.detach()
        export_peft_adapter(weights, out, cfg.base_model.name_or_path, paths=injection.paths)
    else:
        out = run_dir / "hypernet"
        generator.save_pretrained(out)
    say(f"saved {out}")
    return out
