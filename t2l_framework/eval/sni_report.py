"""The end-of-training table on held-out SNI items, comparing how the model is adapted.

Conditions: (a) the base model; (b) the base model with the description in the prompt;
(c) T2L, adapter generated from the held-out description; (d) control: T2L adapter from a
*different* task's description; (e) a trained LoRA baseline (multi-task LoRA), if given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from t2l_framework.runtime.greedy import greedy_generate
from t2l_framework.eval.stats import mean_se
from t2l_framework.eval.text_metrics import exact_match, rouge_l
from t2l_framework.lora.weights import LoraWeights

CONDITIONS = {
    "base": "(a) base model",
    "base+description": "(b) base + description in prompt",
    "t2l": "(c) T2L, held-out description",
    "t2l_other_task_description": "(d) T2L, another task's description",
    "mt_lora": "(e) multi-task LoRA",
}


def evaluate_conditions(model, tokenizer, injection, items: list[dict],
                        make_weights: Callable[[list[int]], LoraWeights] | None,
                        baseline: LoraWeights | None = None, batch_size: int = 16,
                        max_new_tokens: int = 16, progress: Callable | None = None) -> dict:
    """Score every condition on ``items`` (from ``T2LDataModule.eval_items``).

    make_weights(desc_indices) -> LoraWeights with one adapter per index (the hypernetwork).
    Returns {condition: {"n", "em", "em_se", "rouge_l", "rouge_l_se", "predictions"}}.
    """
    plans: dict[str, tuple[str, Callable | None]] = {"base": ("input_ids", None),
                                                     "base+description": ("prompt_with_description_ids", None)}
    if make_weights is not None:
        plans["t2l"] = ("input_ids", lambda chunk: make_weights([it["desc_idx"] for it in chunk]))
        plans["t2l_other_task_description"] = (
            "input_ids", lambda chunk: make_weights([it["other_desc_idx"] for it in chunk]))
    if baseline is not None:
        plans["mt_lora"] = ("input_ids", lambda chunk: baseline)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    results = {}
    for name, (field, weights_for) in plans.items():
        preds: list[str] = [""] * len(items)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            chunk = [items[i] for i in idx]
            weights = weights_for(chunk) if weights_for else None
            outs = greedy_generate(model, tokenizer, [it[field] for it in chunk], injection, weights, max_new_tokens)
            for i, out in zip(idx, outs):
                preds[i] = out
            if progress:
                progress(name, min(start + batch_size, len(order)), len(order))
        em = [exact_match(p, it["answers"]) for p, it in zip(preds, items)]
        rl = [rouge_l(p, it["answers"]) for p, it in zip(preds, items)]
        (em_m, em_se), (rl_m, rl_se) = mean_se(em), mean_se(rl)
        results[name] = {"n": len(items), "em": em_m, "em_se": em_se, "rouge_l": rl_m, "rouge_l_se": rl_se,
                         "predictions": preds, "em_items": em, "rouge_l_items": rl}
    return results


def paired_differences(results: dict, reference: str = "t2l") -> dict[str, dict]:
    """reference minus each other condition, item by item: {name: {em, em_se, rouge_l, rouge_l_se}}.

    The conditions answer the same items, so the paired standard error is the right yardstick
    for "does T2L beat X": it removes the spread in item difficulty that both share.
    """
    if reference not in results:
        return {}
    ref, out = results[reference], {}
    for name, r in results.items():
        if name == reference:
            continue
        row = {}
        for key in ("em", "rouge_l"):
            mean, se = mean_se([a - b for a, b in zip(ref[f"{key}_items"], r[f"{key}_items"])])
            row[key], row[f"{key}_se"] = mean, se
        out[name] = row
    return out


def markdown_table(title: str, results: dict) -> str:
    lines = [f"**{title}**", "", "| condition | items | exact match | ROUGE-L |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {CONDITIONS.get(name, name)} | {r['n']} | {r['em']:.3f} ± {r['em_se']:.3f} | "
                     f"{r['rouge_l']:.3f} ± {r['rouge_l_se']:.3f} |")
    diffs = paired_differences(results)
    if diffs:
        lines += ["", "| (c) T2L minus | exact match | ROUGE-L |", "|---|---:|---:|"]
        for name, d in diffs.items():
            lines.append(f"| {CONDITIONS.get(name, name)} | {d['em']:+.3f} ± {d['em_se']:.3f} "
                         f"({_in_se(d['em'], d['em_se'])}) | {d['rouge_l']:+.3f} ± {d['rouge_l_se']:.3f} "
                         f"({_in_se(d['rouge_l'], d['rouge_l_se'])}) |")
    return "\n".join(lines)


def _in_se(mean: float, se: float) -> str:
    return f"{mean / se:+.1f} SE" if se > 0 else "n/a"


def write_report(out_dir: Path, tables: dict[str, dict], items: dict[str, list[dict]]) -> str:
    """Write report.md and report.json (with per-item predictions); return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = "\n\n".join(markdown_table(title, res) for title, res in tables.items())
    (out_dir / "report.md").write_text(md + "\n\n(± is one standard error over items; differences are paired "
                                       "over the same items)\n")
    payload = {}
    for title, res in tables.items():
        payload[title] = {
            name: {k: v for k, v in r.items() if k in ("n", "em", "em_se", "rouge_l", "rouge_l_se")}
            for name, r in res.items()}
        payload[title]["items"] = [
            {"task": it["task"], "answers": it["answers"], **{n: r["predictions"][i] for n, r in res.items()}}
            for i, it in enumerate(items[title])]
    (out_dir / "report.json").write_text(json.dumps(payload, indent=1))
    return md



def rescore(report_json: Path) -> dict[str, dict]:
    """Rebuild the tables (with paired differences) from a saved report.json."""
    data = json.loads(Path(report_json).read_text())
    tables = {}
    for title, section in data.items():
        items = section["items"]
        names = [n for n in section if n != "items"]
        tables[title] = {}
        for name in names:
            em = [exact_match(it[name], it["answers"]) for it in items]
            rl = [rouge_l(it[name], it["answers"]) for it in items]
            (em_m, em_se), (rl_m, rl_se) = mean_se(em), mean_se(rl)
            tables[title][name] = {"n": len(items), "em": em_m, "em_se": em_se, "rouge_l": rl_m,
                                   "rouge_l_se": rl_se, "em_items": em, "rouge_l_items": rl}
    return tables


if __name__ == "__main__":
    import sys

    for path in sys.argv[1:]:
        print("\n\n".join(markdown_table(t, r) for t, r in rescore(Path(path)).items()))
