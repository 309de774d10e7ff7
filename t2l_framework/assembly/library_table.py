"""The library comparison table (docs/library.md): task LoRAs (oracle), recon T2L L/M/S, SFT T2L,
multi-task LoRA, Arrow routing over the library and the base model on the library recipe's held-out SNI items, with
task-clustered SEs, paired differences, and the sizes (library vs each hypernetwork).

    python -m t2l_framework.assembly.library_table --library runs/smollm2_library \
        --t2l recon_L=runs/smollm2_library_L --t2l sft=runs/smollm2_library_sft \
        --mtlora runs/smollm2_library_mtlora/adapter --out runs/library_table

Seen split: held-out instances of the library's training tasks, each with a held-out
description (``eval.report_seen_per_task`` per task); unseen split: the recipe's eval tasks.
The oracle row uses each item's own task LoRA, so it exists on the seen split only. Arrow
routes every token over the whole library without a description (``lora/arrow.py``, the same
library ``t2l eval RUN --adapters arrow=LIBRARY_DIR`` reads, mttl's defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from t2l_framework.assembly import loading
from t2l_framework.assembly.final_report import per_task
from t2l_framework.assembly.fit import planned_device
from t2l_framework.assembly.lookups import load_recipe
from t2l_framework.atomic import write_text_atomic
from t2l_framework.eval.sni_report import score
from t2l_framework.eval.stats import paired_difference
from t2l_framework.lora.arrow import load_arrow_library
from t2l_framework.lora.peft_io import import_peft_adapter
from t2l_framework.lora.weights import LoraWeights
from t2l_framework.run_folder import HYPERNET_WEIGHTS, RunFolder
from t2l_framework.runtime.greedy import greedy_generate
from t2l_framework.training.training_status import TrainingStatus

ARROW = "Arrow routing"


def _params(folder: Path) -> int:
    """Parameters stored in a hypernet.safetensors (read from the header shapes)."""
    with safe_open(str(folder / HYPERNET_WEIGHTS), framework="pt") as f:
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


def _evaluate(model, tokenizer, injection, items, weights_for, batch_size: int, max_new_tokens: int,
              arrow=None) -> dict:
    """Greedy answers for ``items`` (per-sample adapters from ``weights_for``, or Arrow routing over
    the ``arrow`` library), scored."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    preds = [""] * len(items)
    with injection.use_arrow(arrow) if arrow is not None else nullcontext():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            chunk = [items[i] for i in idx]
            outs = greedy_generate(model, tokenizer, [it["input_ids"] for it in chunk], injection,
                                   weights_for(chunk) if weights_for else None, max_new_tokens)
            for i, out in zip(idx, outs):
                preds[i] = out
    return score(preds, items)


def build_table(library_run: Path, t2l_runs: dict[str, Path], mtlora: Path | None, out: Path,
                progress=print) -> dict:
    """Evaluate every condition on both splits, write ``out/table.md`` + ``out/table.json``; returns the payload."""
    run = RunFolder(library_run)
    cfg = load_recipe(run.recipe, check_files=False)
    base, injection = loading.load_base(cfg.base_model, list(cfg.lora.target_modules),
                                        runs_on=planned_device(cfg.trainer.accelerator))
    from t2l_framework.data.datamodule import T2LDataModule

    fmt = partial(base.family.format_prompt, base.tokenizer, chat_template=bool(cfg.base_model.chat_template))
    dm = T2LDataModule(cfg.data, base.tokenizer, lambda user, system="": fmt(user, system), int(cfg.training.seed),
                       None, 1)
    dm.setup()
    device = next(base.model.parameters()).device
    library = {tid: import_peft_adapter(run.library / tid) for tid in dm.train_task_ids}
    conditions: dict[str, tuple] = {"base": (None, None)}
    conditions["oracle (task LoRAs)"] = (lambda c: LoraWeights.cat([library[it["task"]] for it in c]).to(device),
                                         run.root)
    for name, folder in t2l_runs.items():
        gen = loading.load_adapter_generator(folder, device)
        conditions[name] = ((lambda g: lambda c: g.adapters([dm.descriptions[it["desc_idx"]] for it in c]))(gen),
                            Path(folder))
    if mtlora is not None:
        w = import_peft_adapter(mtlora).to(device)
        conditions["multi-task LoRA"] = ((lambda c: w), Path(mtlora).parent)
    arrow = load_arrow_library(run.library).to(device)
    conditions[ARROW] = (None, None)
    splits = {"seen": per_task(dm.eval_items("seen"), int(cfg.eval.report_seen_per_task) or 10**9),
              "unseen": dm.eval_items("unseen")}
    results: dict[str, dict] = {}
    for split, items in splits.items():
        results[split] = {}
        for name, (weights_for, _) in conditions.items():
            if name.startswith("oracle") and split == "unseen":
                continue  # no task LoRA exists for a task never trained
            t0 = time.time()
            results[split][name] = _evaluate(base.model, base.tokenizer, injection, items, weights_for,
                                             int(cfg.eval.batch_size), int(cfg.eval.max_new_tokens),
                                             arrow if name == ARROW else None)
            progress(f"  {split:<6} {name:<22} {len(items)} items in {time.time() - t0:.0f} s")
    per_task_params = sum(a[0].numel() + library[next(iter(library))].B[m][0].numel()
                          for m, a in library[next(iter(library))].A.items())
    sizes = {"library": per_task_params * len(library), "tasks": len(library), "per_task": per_task_params,
             "hypernetworks": {name: _params(RunFolder(folder).hypernet) for name, folder in t2l_runs.items()}}
    training = {name: (TrainingStatus.load(folder).describe() if folder and TrainingStatus.load(folder) else "-")
                for name, (_, folder) in conditions.items()}
    payload = {"results": {s: {n: {k: r[k] for k in ("n", "n_tasks", "em", "em_se", "rouge_l", "rouge_l_se")}
                               for n, r in res.items()} for s, res in results.items()},
               "sizes": sizes, "training": training}
    out.mkdir(parents=True, exist_ok=True)
    md = render(results, sizes, training)
    write_text_atomic(out / "table.md", md + "\n")
    write_text_atomic(out / "table.json", json.dumps(payload, indent=1) + "\n")
    print(md)
    return payload


def _pm(mean: float, se: float) -> str:
    return f"{mean:.3f} ± {'n/a' if se != se else f'{se:.3f}'}"


def render(results: dict, sizes: dict, training: dict) -> str:
    """The Markdown: one table per split (paired differences against the oracle on the seen split,
    against the base model on the unseen one), then the sizes."""
    lines = []
    titles = {"seen": "Training tasks, held-out instances and descriptions", "unseen": "Tasks never seen in training"}
    for split, res in results.items():
        ref = "oracle (task LoRAs)" if split == "seen" else "base"
        n_tasks = max((r["n_tasks"] for r in res.values()), default=0)
        lines += [f"**{titles[split]}** ({n_tasks} tasks)", "",
                  f"| condition | items | exact match | ROUGE-L | ROUGE-L minus {ref} (cSE) | training |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, r in res.items():
            if name == ref:
                diff = "-"
            else:
                d, se = paired_difference(r["rouge_l_items"], res[ref]["rouge_l_items"], r["tasks"])
                diff = f"{d:+.3f} ± {se:.3f}" + (f" ({d / se:+.1f})" if se > 0 else "")
            keep = (f"; keeps {r['rouge_l'] / res[ref]['rouge_l']:.0%} of the oracle"
                    if split == "seen" and name != ref and res[ref]["rouge_l"] > 0 else "")
            lines.append(f"| {name} | {r['n']} | {_pm(r['em'], r['em_se'])} | {_pm(r['rouge_l'], r['rouge_l_se'])} | "
                         f"{diff}{keep} | {training.get(name, '-')} |")
        lines.append("")
    lines += ["| sizes | parameters | library / this |", "|---|---:|---:|",
              f"| library: {sizes['tasks']} task LoRAs x {sizes['per_task']:,} | {sizes['library']:,} | 1.0x |"]
    for name, n in sizes["hypernetworks"].items():
        lines.append(f"| {name} hypernetwork | {n:,} | {sizes['library'] / n:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The library comparison table (docs/library.md).")
    ap.add_argument("--library", type=Path, required=True, help="a training.mode=library run folder")
    ap.add_argument("--t2l", action="append", default=[], metavar="NAME=RUN", help="a T2L run (recon or SFT)")
    ap.add_argument("--mtlora", type=Path, help="the multi-task LoRA's PEFT folder (RUN/adapter)")
    ap.add_argument("--out", type=Path, default=Path("runs/library_table"))
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.t2l:
        name, _, path = spec.partition("=")
        runs[name] = Path(path)
    build_table(args.library, runs, args.mtlora, args.out, progress=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
