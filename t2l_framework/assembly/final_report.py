"""The table `t2l fit` prints at the end: held-out SNI items under each adaptation condition."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from t2l_framework.config import resolve_path
from t2l_framework.console import say
from t2l_framework.eval.sni_report import evaluate_conditions, write_report
from t2l_framework.lora.peft_io import import_peft_adapter
from t2l_framework.run_folder import RunFolder


def _progress(name: str, done: int, total: int) -> None:
    end = "\n" if done >= total else "\r"
    print(f"  {name:<28} {done:>4}/{total}", end=end, file=sys.stderr, flush=True)


def final_report(cfg, run: RunFolder, pieces, recipe_file: Path | None = None) -> str:
    """Score base / base+description / T2L / wrong-description control / baseline LoRA with the
    trained ``pieces`` (``RunPieces``) and write ``report.md`` + ``report.json`` into the run
    folder; returns the Markdown."""
    base, injection, dm, embeddings, generator = (pieces.base, pieces.injection, pieces.datamodule,
                                                  pieces.embeddings, pieces.trainable)
    run_dir = run.root
    model, device = base.model, next(base.model.parameters()).device
    generator.eval()
    make_weights = None
    if cfg.training.mode == "sft":
        emb, generator = embeddings.to(device), generator.to(device)

        @torch.inference_mode()
        def make_weights(desc_idx: list[int]):
            return generator(emb[torch.as_tensor(desc_idx, device=device)])

    baseline = None
    if cfg.training.mode == "lora":
        with torch.no_grad():
            w = generator()
            baseline = w.detach()
    elif cfg.eval.baseline_adapter:
        path = resolve_path(cfg.eval.baseline_adapter, recipe_file)
        if path.exists():
            baseline = import_peft_adapter(path)
        else:
            say(f"eval.baseline_adapter {path} not found; the table leaves out (e). "
                "Train it with the multi-task LoRA recipe first.")
    limit = int(cfg.eval.report_max_items)
    tables, items = {}, {}
    for split, title in (("seen", "Training tasks, held-out instances and descriptions"),
                         ("unseen", "Tasks never seen in training")):
        its = dm.eval_items(split)
        if limit:
            its = its[:limit]
        if not its:
            continue
        say(f"evaluating {len(its)} items: {title}")
        items[title] = its
        tables[title] = evaluate_conditions(model, base.tokenizer, injection, its, make_weights, baseline,
                                            batch_size=int(cfg.eval.batch_size),
                                            max_new_tokens=int(cfg.eval.max_new_tokens), progress=_progress)
    md = write_report(run_dir, tables, items)
    print(md)
    return md
