"""The table `t2l fit` prints at the end: held-out SNI items under each adaptation condition."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from t2l_framework.config import resolve_path
from t2l_framework.console import say
from t2l_framework.eval.sni_report import T2L_CONDITIONS, evaluate_conditions, write_report
from t2l_framework.lora.arrow import load_arrow_library
from t2l_framework.lora.peft_io import import_peft_adapter
from t2l_framework.run_folder import RunFolder
from t2l_framework.training.modes import Trainable, mode_for
from t2l_framework.training.training_status import TrainingStatus


def _progress(name: str, done: int, total: int) -> None:
    end = "\n" if done >= total else "\r"
    print(f"  {name:<28} {done:>4}/{total}", end=end, file=sys.stderr, flush=True)


def per_task(items: list[dict], n: int) -> list[dict]:
    """The first ``n`` items of each task, order kept: the in-distribution table can be smaller
    than the unseen one, whose size is what the zero-shot claim rests on."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        seen[it["task"]] = seen.get(it["task"], 0) + 1
        if seen[it["task"]] <= n:
            out.append(it)
    return out


def training_column(cfg, run_dir: Path, baseline_dir: Path | None) -> dict[str, str]:
    """condition -> how its run trained (steps, examples, wall time, or 'cut short at step N of M').

    (c) and (d) come from this run; (e) from the run folder that holds the baseline adapter
    (a multi-task LoRA trained by ``t2l fit`` records its steps there). A baseline trained with
    different work than this run is flagged: the comparison is meant to be by equal work.
    """
    own = TrainingStatus.load(run_dir)
    if mode_for(cfg).trains is Trainable.ONE_LORA:  # the run's LoRA is the table's baseline
        return {"mt_lora": own.describe()} if own else {}
    column = {name: own.describe() for name in T2L_CONDITIONS} if own else {}
    if baseline_dir is not None:
        other = TrainingStatus.load(baseline_dir)
        if other is None:
            column["mt_lora"] = f"unknown (no {RunFolder(baseline_dir).status.name} in {baseline_dir})"
        else:
            column["mt_lora"] = other.describe()
            if own and (other.steps, other.examples) != (own.steps, own.examples):
                column["mt_lora"] += (f"; not the same work as T2L ({own.steps} step{'s' * (own.steps != 1)}, "
                                      f"{own.examples:,} examples)")
    return column


def final_report(cfg, run: RunFolder, pieces, recipe_file: Path | None = None,
                 seconds: dict[str, float] | None = None) -> str:
    """Score base / base+description / T2L / the description controls / baseline LoRA with the
    trained ``pieces`` (``RunPieces``) and write ``report.md`` + ``report.json`` into the run
    folder; returns the Markdown. seconds (part -> wall seconds, e.g. training) receives one
    entry per table and goes into report.json with them."""
    base, injection, dm, embeddings, generator = (pieces.base, pieces.injection, pieces.datamodule,
                                                  pieces.embeddings, pieces.trainable)
    run_dir = run.root
    model, device = base.model, next(base.model.parameters()).device
    generator.eval()
    make_weights = text_weights = None
    trains = pieces.mode.trains
    if trains is Trainable.HYPERNETWORK:
        emb, generator = embeddings.to(device), generator.to(device)
        encoder = pieces.encoder

        @torch.inference_mode()
        def make_weights(desc_idx: list[int]):
            return generator(emb[torch.as_tensor(desc_idx, device=device)])

        @torch.inference_mode()
        def text_weights(texts: list[str]):  # the controls' texts are not among the embedded descriptions
            return generator(encoder.encode(texts).to(device))

    baseline, baseline_dir = None, None
    if trains is Trainable.ONE_LORA:
        with torch.no_grad():
            w = generator()
            baseline = w.detach()
    elif cfg.eval.baseline_adapter:
        path = resolve_path(cfg.eval.baseline_adapter, recipe_file)
        if path.exists():
            baseline, baseline_dir = import_peft_adapter(path), path.parent
        else:
            say(f"eval.baseline_adapter {path} not found; the table leaves out (e). "
                "Train it with the multi-task LoRA recipe first.")
    arrow = None
    if cfg.eval.arrow_library:
        path = resolve_path(cfg.eval.arrow_library, recipe_file)
        if path.is_dir():
            arrow = load_arrow_library(path)
            arrow.check_fits(injection.shapes, "the trained model's LoRA targets")
            arrow = arrow.to(device)
        else:
            say(f"eval.arrow_library {path} not found; the table leaves out (h).")
    seconds = {} if seconds is None else seconds
    limit = int(cfg.eval.report_max_items)
    tables, items = {}, {}
    for split, title in (("seen", "Training tasks, held-out instances and descriptions"),
                         ("unseen", "Tasks never seen in training")):
        its = dm.eval_items(split)
        if split == "seen" and int(cfg.eval.report_seen_per_task):
            its = per_task(its, int(cfg.eval.report_seen_per_task))
        if limit:
            its = its[:limit]
        if not its:
            continue
        say(f"evaluating {len(its)} items: {title}")
        items[title] = its
        start = time.perf_counter()
        tables[title] = evaluate_conditions(model, base.tokenizer, injection, its, make_weights, baseline,
                                            batch_size=int(cfg.eval.batch_size),
                                            max_new_tokens=int(cfg.eval.max_new_tokens), progress=_progress,
                                            text_weights=text_weights, descriptions=dm.descriptions,
                                            seed=int(cfg.training.seed), arrow=arrow)
        seconds[f"table: {title} ({len(its)} items x {len(tables[title])} conditions)"] = time.perf_counter() - start
    md = write_report(run_dir, tables, items, training_column(cfg, run_dir, baseline_dir), seconds)
    print(md)
    return md
