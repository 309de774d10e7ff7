"""``t2l fit``: a recipe's pieces built once (``RunPieces``), trained, saved, and reported."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from t2l_framework.assembly import loading
from t2l_framework.assembly.lookups import build_encoder, head_lookup, load_recipe
from t2l_framework.config import find_recipe
from t2l_framework.console import say
from t2l_framework.run_folder import RunFolder
from t2l_framework.training.modes import TrainingMode, mode_for

if TYPE_CHECKING:
    import lightning as L

    from t2l_framework.encoders import TextEncoder
    from t2l_framework.llm.loading import LoadedModel
    from t2l_framework.lora.batched import LoraInjection
    from t2l_framework.lora.weights import ModuleShapes


@dataclass
class RunPieces:
    """Everything ``t2l fit`` trains with, built from one recipe.

    mode: the recipe's ``TrainingMode`` (it built the data module and the trainable).
    base: the frozen base model (None when the mode needs none: recon).
    injection: batched LoRA on ``lora.target_modules`` of the base (None without a base).
    datamodule: what ``mode.datamodule`` built: ``T2LDataModule`` (task instances) or
    ``ReconDataModule`` (recon).
    embeddings: task-description embeddings ``[n_descriptions, enc_dim]`` (None when the mode
    trains no hypernetwork).
    encoder: the ``TextEncoder`` that made them (None with them).
    trainable: what the optimizer updates: ``HyperNetwork`` (sft / recon), ``LearnedLora`` (lora) or
    ``TaskLoraBank`` (library: one LoRA per training task).
    seconds: wall time of each part built (loading the base model, embedding descriptions), for
    the time breakdown at the end of ``t2l fit``.
    """

    mode: TrainingMode
    base: LoadedModel | None
    injection: LoraInjection | None
    datamodule: L.LightningDataModule
    embeddings: torch.Tensor | None
    encoder: TextEncoder | None
    trainable: torch.nn.Module
    seconds: dict[str, float] = field(default_factory=dict)


def planned_device(accelerator: str) -> str:
    """The device type the Trainer will use for ``trainer.accelerator`` (decides ``dtype: auto``)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def build_pieces(cfg, recipe_file: Path | None, run: RunFolder) -> RunPieces:
    """Base model + injection, data module, embeddings and the trainable module for the recipe's mode."""
    from t2l_framework.encoders.cache import EmbeddingCache
    from t2l_framework.hypernet.hypernetwork import HyperNetwork

    mode = mode_for(cfg, recipe_file)
    # micro-batches per rank; the stream holds world-size times as many (data.stream)
    total = int(cfg.trainer.max_steps) * int(cfg.trainer.accumulate_grad_batches) + 1
    base = injection = None
    seconds: dict[str, float] = {}
    if mode.needs_base_model:
        t0 = time.time()
        say(f"loading base model {cfg.base_model.name_or_path} ...")
        base, injection = loading.load_base(cfg.base_model, list(cfg.lora.target_modules),
                                            runs_on=planned_device(cfg.trainer.accelerator))
        seconds["load base model"] = time.time() - t0
        say(f"base model loaded in {seconds['load base model']:.1f} s")
    dm = mode.datamodule(total, base)
    embeddings = encoder = None
    if mode.embeds_descriptions:
        t0 = time.time()
        encoder = build_encoder(cfg.encoder)
        embeddings = EmbeddingCache(encoder, dm.descriptions, run.embedding_cache,
                                    device=planned_device(cfg.trainer.accelerator)).embeddings
        seconds[f"embed {len(dm.descriptions)} descriptions (encoder load + cache)"] = time.time() - t0
        say(f"embedded {len(dm.descriptions)} descriptions in {time.time() - t0:.1f} s")

    def hypernetwork(shapes: ModuleShapes) -> torch.nn.Module:
        return HyperNetwork.from_recipe(cfg, shapes, embeddings.shape[1], heads=head_lookup(import_code=True))

    trainable = mode.trainable(dm, injection, hypernetwork)
    n_params = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    say(f"{type(trainable).__name__}: {n_params / 1e6:.2f}M trainable parameters")
    return RunPieces(mode, base, injection, dm, embeddings, encoder, trainable, seconds)


def fit(recipe: str | Path, overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False,
        callbacks: list | None = None, report: bool = True) -> Path:
    """Train a recipe into its run folder; returns the folder. With ``report`` and the recipe's
    ``eval.final_report``, the end-of-training table follows (``final_report``)."""
    import lightning as L

    from t2l_framework.eval.sni_report import time_breakdown
    from t2l_framework.training.run import prepare_run_folder, train
    from t2l_framework.training.sharding import check_sharded_recipe

    started = time.perf_counter()
    cfg = load_recipe(recipe, overrides)
    recipe_file = find_recipe(recipe)
    check_sharded_recipe(cfg)  # before minutes of model loading
    if cfg.data.task_set and mode_for(cfg).reads_instances:  # before minutes of model loading
        from t2l_framework.data.task_sets import check_task_set

        check_task_set(cfg.data, recipe_file)
    run = RunFolder.for_recipe(cfg, recipe_file)
    ckpt = prepare_run_folder(cfg, run, resume, overwrite)
    torch.set_float32_matmul_precision("high")
    L.seed_everything(int(cfg.training.seed), workers=True, verbose=False)

    pieces = build_pieces(cfg, recipe_file, run)
    seconds = pieces.seconds
    t0 = time.perf_counter()
    trainer = train(cfg, run, pieces, ckpt, callbacks)
    seconds[f"train ({trainer.global_step} steps)"] = time.perf_counter() - t0
    if not trainer.is_global_zero:  # every rank holds the same trained weights: rank 0 writes them
        return run.root
    t0 = time.perf_counter()
    pieces.mode.save(run, pieces, trainer)
    seconds["save the result"] = time.perf_counter() - t0
    if report and pieces.mode.end_of_training_table and cfg.eval.final_report:
        from t2l_framework.assembly.final_report import final_report

        final_report(cfg, run, pieces, recipe_file, seconds)  # adds each table's time; report.json keeps them
    say(time_breakdown(seconds, time.perf_counter() - started))
    say(f"run folder: {run.root}")
    return run.root
