"""``t2l fit``: a recipe's pieces built once (``RunPieces``), trained, saved, and reported."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from t2l_framework.assembly import loading
from t2l_framework.assembly.lookups import build_encoder, head_lookup, load_recipe
from t2l_framework.config import find_recipe
from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.run_folder import RunFolder


@dataclass
class RunPieces:
    """Everything ``t2l fit`` trains with, built from one recipe.

    base: the frozen ``LoadedModel`` (None in recon mode, which needs no base model).
    injection: ``LoraInjection`` on ``lora.target_modules`` (None in recon mode).
    datamodule: ``T2LDataModule`` (sft / lora) or ``ReconDataModule`` (recon).
    embeddings: task-description embeddings ``[n_descriptions, enc_dim]`` (None in lora mode).
    encoder: the ``TextEncoder`` that made them (None in lora mode).
    trainable: what the optimizer updates: ``HyperNetwork`` (sft / recon), ``LearnedLora`` (lora) or
    ``TaskLoraBank`` (library: one LoRA per training task).
    seconds: wall time of each part built (loading the base model, embedding descriptions), for
    the time breakdown at the end of ``t2l fit``.
    """

    base: Any
    injection: Any
    datamodule: Any
    embeddings: torch.Tensor | None
    encoder: Any
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
    from t2l_framework.training.module import LearnedLora

    mode = cfg.training.mode
    # micro-batches per rank; the stream holds world-size times as many (data.stream)
    total = int(cfg.trainer.max_steps) * int(cfg.trainer.accumulate_grad_batches) + 1
    base = injection = None
    seconds: dict[str, float] = {}
    if mode == "recon":
        from t2l_framework.training.recon import ReconDataModule, library_shapes

        dm = ReconDataModule(cfg.data, int(cfg.training.seed), recipe_file, total, lora=cfg.lora)
        shapes = library_shapes(dm.targets)
    else:
        from t2l_framework.data.datamodule import T2LDataModule

        t0 = time.time()
        say(f"loading base model {cfg.base_model.name_or_path} ...")
        base, injection = loading.load_base(cfg.base_model, list(cfg.lora.target_modules),
                                            runs_on=planned_device(cfg.trainer.accelerator))
        seconds["load base model"] = time.time() - t0
        say(f"base model loaded in {seconds['load base model']:.1f} s")
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
        embeddings = EmbeddingCache(encoder, dm.descriptions, run.embedding_cache,
                                    device=planned_device(cfg.trainer.accelerator)).embeddings
        seconds[f"embed {len(dm.descriptions)} descriptions (encoder load + cache)"] = time.time() - t0
        say(f"embedded {len(dm.descriptions)} descriptions in {time.time() - t0:.1f} s")
        trainable = HyperNetwork.from_recipe(cfg, shapes, embeddings.shape[1], heads=head_lookup(import_code=True))
        if mode == "sft" and cfg.training.mtlora_offset:
            from t2l_framework.config import resolve_path
            from t2l_framework.lora.peft_io import import_peft_adapter

            folder = resolve_path(cfg.training.mtlora_offset, recipe_file)
            if (folder / "adapter" / "adapter_config.json").is_file():
                folder = folder / "adapter"  # a multi-task LoRA run folder
            offset = import_peft_adapter(folder)
            try:
                trainable.set_output_offset(offset)
            except T2LError as exc:
                raise T2LError(f"training.mtlora_offset {folder}: {exc}") from None
            say(f"the hypernetwork's output starts from the LoRA in {folder}")
    elif mode == "library":
        from t2l_framework.training.library import TaskLoraBank

        trainable = TaskLoraBank(shapes, dm.train_task_ids, int(cfg.lora.rank), float(cfg.lora.alpha),
                                 bool(cfg.lora.use_rslora))
    else:
        trainable = LearnedLora(shapes, int(cfg.lora.rank), float(cfg.lora.alpha), bool(cfg.lora.use_rslora))
    n_params = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    say(f"{type(trainable).__name__}: {n_params / 1e6:.2f}M trainable parameters")
    return RunPieces(base, injection, dm, embeddings, encoder, trainable, seconds)


def fit(recipe: str | Path, overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False,
        callbacks: list | None = None, report: bool = True) -> Path:
    """Train a recipe into its run folder; returns the folder. With ``report`` and the recipe's
    ``eval.final_report``, the end-of-training table follows (``final_report``)."""
    import lightning as L

    from t2l_framework.eval.sni_report import time_breakdown
    from t2l_framework.training.run import prepare_run_folder, save_result, train
    from t2l_framework.training.sharding import check_sharded_recipe

    started = time.perf_counter()
    cfg = load_recipe(recipe, overrides)
    recipe_file = find_recipe(recipe)
    check_sharded_recipe(cfg)  # before minutes of model loading
    if cfg.data.task_set and cfg.training.mode != "recon":  # before minutes of model loading
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
    if cfg.training.mode == "library":
        from t2l_framework.training.library import save_library

        save_library(cfg, run, pieces, trainer)
    else:
        save_result(cfg, run, pieces.trainable, pieces.injection)
    if cfg.training.mode == "recon":
        from t2l_framework.training.recon_error import write_recon_report

        write_recon_report(run, pieces.trainable, pieces.embeddings, pieces.datamodule)
    seconds["save the result"] = time.perf_counter() - t0
    if report and cfg.training.mode not in ("recon", "library") and cfg.eval.final_report:
        from t2l_framework.assembly.final_report import final_report

        final_report(cfg, run, pieces, recipe_file, seconds)  # adds each table's time; report.json keeps them
    say(time_breakdown(seconds, time.perf_counter() - started))
    say(f"run folder: {run.root}")
    return run.root
