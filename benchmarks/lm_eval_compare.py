"""`t2l eval --protocol lm-eval` next to lm-evaluation-harness 0.4.x on the same items.

Both score the first N items (default 200) of the seven multiple-choice benchmarks from the
vendored data/eval files, float32 on the CPU. lm-evaluation-harness runs its own task configs
(each custom task ``include``s the harness's YAML and only swaps the dataset for a local JSON
file of our items), its HF model pointed at the safetensors folder our loader converts the
recipe's GGUF into. Prints acc / acc_norm of both and the difference (target: within 1 point).

    python benchmarks/lm_eval_compare.py --limit 200 --work /tmp/cmp200   # keeps each side's scores; rerun resumes
    python benchmarks/lm_eval_compare.py --limit 50 --peft adapter/   # a `t2l generate` adapter, both sides

Needs the ``lmeval`` extra (``pip install lm_eval==0.4.13``). No network: datasets and the
hub run offline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCHMARKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
# benchmark -> (the harness's task config, relative to lm_eval/tasks; our data file)
HARNESS_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "eval/arc_easy/test.jsonl.gz"),
    "arc_challenge": ("arc/arc_challenge.yaml", "eval/arc_challenge/test.jsonl.gz"),
    "boolq": ("super_glue/boolq/default.yaml", "eval/boolq/validation.jsonl.gz"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "eval/hellaswag/validation.jsonl.gz"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "eval/openbookqa/test.jsonl.gz"),
    "piqa": ("piqa/piqa.yaml", "eval/piqa/validation.jsonl.gz"),
    "winogrande": ("winogrande/default.yaml", "eval/winogrande/validation.jsonl.gz"),
}


def local_model_folder(recipe: str) -> Path:
    """The safetensors folder ``t2l`` loads the recipe's base model from (converted from GGUF once)."""
    from t2l_framework.assembly import load_recipe
    from t2l_framework.config import find_recipe
    from t2l_framework.llm.loading import convert_gguf, gguf_cache_dir, resolve_source

    cfg = load_recipe(find_recipe(recipe)).base_model
    source, gguf_file = resolve_source(cfg)
    if gguf_file is None:
        return Path(source)
    folder = gguf_cache_dir(source, gguf_file)
    if not (folder / "config.json").is_file():
        convert_gguf(source, gguf_file, folder)
    return folder


def write_harness_tasks(benchmarks: list[str], limit: int, folder: Path) -> dict[str, str]:
    """One custom task per benchmark: the harness's own YAML, reading our first ``limit`` items."""
    import lm_eval
    from t2l_framework.data.files import read_text

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    names = {}
    for bench in benchmarks:
        config, data = HARNESS_TASKS[bench]
        rows = [json.loads(line) for line in read_text(ROOT / "data" / data).splitlines()
                if line.strip()][:limit]
        if bench == "boolq":  # super_glue/boolq has label 0/1 where google/boolq has answer false/true
            rows = [dict(r, label=int(r["answer"])) for r in rows]
        data_file = folder / f"{bench}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        name = f"t2lcmp_{bench}"
        (folder / f"{name}.yaml").write_text(
            f"include: {tasks_dir / config}\n"
            f"task: {name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
            "training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: null\n",
            encoding="utf-8")
        names[bench] = name
    return names


def run_harness(model_dir: Path, task_names: dict[str, str], folder: Path, peft: str | None,
                batch_size: int) -> dict[str, dict[str, float]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = f"pretrained={model_dir},dtype=float32" + (f",peft={Path(peft).resolve()}" if peft else "")
    out = simple_evaluate(model="hf", model_args=args, tasks=list(task_names.values()),
                          task_manager=TaskManager(include_path=str(folder)), batch_size=batch_size, device="cpu",
                          num_fewshot=0)
    scores = {}
    for bench, name in task_names.items():
        res = out["results"][name]
        scores[bench] = {m: res[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in res}
    return scores


def run_ours(recipe: str, benchmarks: list[str], limit: int, folder: Path, peft: str | None,
             batch_size: int) -> dict[str, dict[str, float]]:
    from t2l_framework import evaluate

    adapter = f"peft={Path(peft).resolve()}" if peft else "base"
    results = evaluate(recipe, benchmarks, [adapter], protocol="lm-eval", limit=limit, dtype="float32", device="cpu",
                       use_cache=False, batch_size=batch_size, output=folder / "ours").results
    name = "peft" if peft else "base"
    scores = {}
    for bench in benchmarks:
        value = results["scores"][name][bench]
        scores[bench] = {"acc": value["score"], **{m: v["score"] for m, v in value["metrics"].items()}}
    return scores


def scored_once(path: Path, key: dict, score) -> tuple[dict, float]:
    """``score()`` and its seconds, saved to ``path`` at once; reused when ``path`` holds the same ``key``."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"[lm_eval_compare] reusing {path}", file=sys.stderr)
            return saved["scores"], saved["seconds"]
    t0 = time.perf_counter()
    scores = score()
    seconds = time.perf_counter() - t0
    path.write_text(json.dumps({"key": key, "scores": scores, "seconds": seconds}, indent=2) + "\n")
    return scores, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="smollm2_demo", help="recipe whose base model is scored (default smollm2_demo)")
    parser.add_argument("--limit", type=int, default=200, help="first N items of each benchmark (default 200)")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated subset of the seven")
    parser.add_argument("--peft", metavar="DIR", help="score this PEFT adapter (e.g. from `t2l generate`) on both sides")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", metavar="FILE", help="also write the numbers here")
    parser.add_argument("--work", metavar="DIR", help="keep the task files and each side's scores here; a rerun with "
                        "the same DIR reuses a side already scored (an hour of CPU for the harness at --limit 200)")
    args = parser.parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("lm_eval is not installed: pip install 'lm_eval==0.4.13' (the lmeval extra)", file=sys.stderr)
        return 2
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [b for b in benchmarks if b not in HARNESS_TASKS]
    if unknown:
        print(f"--benchmarks: {unknown} are not among {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if args.peft and not (Path(args.peft) / "adapter_config.json").is_file():
        print(f"--peft: {args.peft} has no adapter_config.json", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = local_model_folder(args.recipe)
    with contextlib.ExitStack() as stack:
        folder = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lm_eval_compare.")))
        folder.mkdir(parents=True, exist_ok=True)
        key = {"limit": args.limit, "benchmarks": benchmarks, "peft": args.peft, "model": str(model_dir)}
        # the harness first: a broken task config fails fast
        theirs, t_theirs = scored_once(folder / "harness_scores.json", key, lambda: run_harness(
            model_dir, write_harness_tasks(benchmarks, args.limit, folder), folder, args.peft, args.batch_size))
        ours, t_ours = scored_once(folder / "t2l_scores.json", key, lambda: run_ours(
            args.recipe, benchmarks, args.limit, folder, args.peft, args.batch_size))
    rows, worst = [], 0.0
    print(f"\n{'base model' if not args.peft else 'PEFT ' + args.peft}: {model_dir}, first {args.limit} items, float32\n")
    print("| benchmark | metric | t2l eval --protocol lm-eval | lm-evaluation-harness | difference |")
    print("|---|---|---|---|---|")
    for bench in benchmarks:
        for metric, theirs_value in theirs[bench].items():
            mine = ours[bench].get(metric)
            diff = None if mine is None else 100 * (mine - theirs_value)
            worst = max(worst, abs(diff or 0.0))
            rows.append({"benchmark": bench, "metric": metric, "t2l": mine, "lm_eval": theirs_value, "diff_points": diff})
            print(f"| {bench} | {metric} | {'–' if mine is None else f'{100 * mine:.1f}'} | {100 * theirs_value:.1f} | "
                  f"{'–' if diff is None else f'{diff:+.1f}'} |")
    print(f"\nlargest difference: {worst:.1f} points; t2l eval {t_ours:.0f} s, lm-evaluation-harness {t_theirs:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"limit": args.limit, "peft": args.peft, "model": str(model_dir),
                                               "rows": rows, "seconds": {"t2l": t_ours, "lm_eval": t_theirs}},
                                              indent=2) + "\n")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
