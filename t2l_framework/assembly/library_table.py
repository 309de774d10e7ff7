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
from pathlib import Path

import torch
from safetensors import safe_open

from t2l_framework.assembly import loading
from t2l_framework.assembly.evaluate import run_split_benchmarks
from t2l_framework.assembly.fit import planned_device
from t2l_framework.assembly.lookups import load_recipe
from t2l_framework.atomic import write_text_atomic
from t2l_framework.eval.cache import ResultCache
from t2l_framework.eval.harness import AdapterSpec, EvalSettings, Evaluator
from t2l_framework.eval.sni_report import score_predictions
from t2l_framework.eval.stats import paired_difference
from t2l_framework.lora.peft_io import import_peft_adapter
from t2l_framework.run_folder import HYPERNET_WEIGHTS, RunFolder
from t2l_framework.runtime.loaded import T2LRuntime
from t2l_framework.training.training_status import TrainingStatus

ARROW = "Arrow routing"
ORACLE = "oracle (task LoRAs)"


def _params(folder: Path) -> int:
    """Numbers stored in a hypernet.safetensors (read from the header shapes): the weights and,
    for a z-scored recon network, its fixed output offset and scale (two LoRAs' worth)."""
    with safe_open(str(folder / HYPERNET_WEIGHTS), framework="pt") as f:
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


def build_table(library_run: Path, t2l_runs: dict[str, Path], mtlora: Path | None, out: Path,
                progress=print) -> dict:
    """Evaluate every condition on both splits, write ``out/table.md`` + ``out/table.json``; returns the payload.

    The answers come from the evaluation harness on the library run's own splits
    (``assembly.evaluate.run_split_benchmarks``), the pipeline of ``t2l eval`` and the end-of-training table.
    """
    from t2l_framework.data.datamodule import T2LDataModule

    run = RunFolder(library_run)
    cfg = load_recipe(run.recipe, check_files=False)
    base, injection = loading.load_base(cfg.base_model, list(cfg.lora.target_modules),
                                        runs_on=planned_device(cfg.trainer.accelerator))
    runtime = T2LRuntime(base, injection, None, bool(cfg.base_model.chat_template), base.dtype.name)
    dm = T2LDataModule(cfg.data, None, None, int(cfg.training.seed), run.recipe)
    specs = [AdapterSpec("base", "base"), AdapterSpec(ORACLE, "library", run.library)]
    folders: dict[str, Path | None] = {"base": None, ORACLE: run.root}
    for name, folder in t2l_runs.items():
        specs.append(AdapterSpec(name, "t2l", Path(folder)))
        folders[name] = Path(folder)
    if mtlora is not None:
        specs.append(AdapterSpec("multi-task LoRA", "peft", Path(mtlora)))
        folders["multi-task LoRA"] = Path(mtlora).parent
    specs.append(AdapterSpec(ARROW, "arrow", run.library))
    folders[ARROW] = None
    settings = EvalSettings(batch_size=int(cfg.eval.batch_size), n_descriptions=int(cfg.eval.n_descriptions))
    results: dict[str, dict] = {}
    for name, bench in run_split_benchmarks(cfg, dm).items():
        split = "seen" if name == "sni_seen" else "unseen"
        # no task LoRA exists for a task never trained
        conditions = [s for s in specs if split == "seen" or s.kind != "library"]
        t0 = time.time()
        evaluator = Evaluator(runtime, conditions, settings, ResultCache(None), show_progress=False,
                              load_generator=loading.load_adapter_generator)
        results[split] = score_predictions(evaluator.run_benchmark(bench), bench.examples())
        progress(f"  {split:<6} {len(bench.examples())} items x {len(conditions)} conditions "
                 f"in {time.time() - t0:.0f} s")
    library = {d.name: import_peft_adapter(d) for d in sorted(run.library.iterdir())
               if (d / "adapter_config.json").is_file()}
    first = library[next(iter(library))]
    per_task_params = sum(a[0].numel() + first.B[m][0].numel() for m, a in first.A.items())
    sizes = {"library": per_task_params * len(library), "tasks": len(library), "per_task": per_task_params,
             "hypernetworks": {name: _params(RunFolder(folder).hypernet) for name, folder in t2l_runs.items()}}
    training = {name: (TrainingStatus.load(folder).describe() if folder and TrainingStatus.load(folder) else "-")
                for name, folder in folders.items()}
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
        ref = ORACLE if split == "seen" else "base"
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
    lines += ["| sizes | numbers stored | library / this |", "|---|---:|---:|",
              f"| library: {sizes['tasks']} task LoRAs x {sizes['per_task']:,} | {sizes['library']:,} | 1.0x |"]
    for name, n in sizes["hypernetworks"].items():
        lines.append(f"| {name} hypernetwork | {n:,} | {sizes['library'] / n:.1f}x |")
    lines += ["", "(A hypernetwork's count is its saved file: the weights and, for recon_loss=factors_z, the "
              "library's per-entry mean and std it emits z-scores of, two LoRAs' worth.)"]
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
