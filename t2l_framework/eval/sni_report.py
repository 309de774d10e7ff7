"""The end-of-training table on held-out SNI items, comparing how the model is adapted.

The answers come from the evaluation harness (``eval.harness`` on a run's ``RunSplit``, the
pipeline of ``t2l eval RUN --benchmarks sni_unseen``); this module scores them per condition
and writes the table.

Conditions: (a) the base model; (b) the base model with the description in the prompt;
(c) T2L, adapter generated from the held-out description; (d) control: T2L adapter from a
*different* task's description; (e) a trained LoRA baseline (multi-task LoRA), if given;
(f) control: T2L adapter from random letters of the description's length; (g) control: T2L
adapter from one generic description for every task (``data.description_controls``).
(h) Arrow routing over a library of task LoRAs (``eval.arrow_library``), if given.

Standard errors are clustered by task (CR1, ``eval.stats``): items of one task share a
format and a difficulty, so they are not independent, and an item-level SE would overstate
how sure a 20-task table can be. Differences are paired over the same items and clustered the
same way. Every trained condition shows the steps and wall time it trained, and a run that
``trainer.max_time`` cut short is marked on each of its rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from t2l_framework.atomic import atomic_file
from t2l_framework.data.description_controls import GENERIC_DESCRIPTION
from t2l_framework.errors import T2LError
from t2l_framework.eval.stats import clustered_mean_se, paired_difference
from t2l_framework.eval.text_metrics import exact_match, rouge_l

CONDITIONS = {
    "base": "(a) base model",
    "base+description": "(b) base + description in prompt",
    "t2l": "(c) T2L, held-out description",
    "t2l_other_task_description": "(d) T2L, another task's description",
    "mt_lora": "(e) multi-task LoRA",
    "t2l_random_description": "(f) T2L, random letters of the description's length",
    "t2l_generic_description": f"(g) T2L, one generic description ('{GENERIC_DESCRIPTION}')",
    "arrow": "(h) Arrow routing over the LoRA library",
}
_ORDER = {name: i for i, name in enumerate(CONDITIONS)}
# Conditions made by this run's hypernetwork: their training column is the run's own.
T2L_CONDITIONS = ("t2l", "t2l_other_task_description", "t2l_random_description", "t2l_generic_description")
METRICS = ("em", "rouge_l")
LIKELIHOOD = "answer_logprob"  # mean log-probability per token of the reference answer (nats/token)
METRIC_NAMES = {"em": "exact match", "rouge_l": "ROUGE-L", LIKELIHOOD: "answer log-lik (nats/token)"}
FOOTNOTE = ("(± is one standard error clustered by task (CR1): items of one task are not independent. "
            "Differences are paired over the same items, clustered the same way; 'cSE' = that standard error. "
            "'training' gives the steps, examples and wall time of the run that trained each condition. "
            "'answer log-lik' is the mean log-probability per token of the item's reference answer and its "
            "end-of-sequence token under the condition (best over references; higher is better): the quantity "
            "training maximises, which moves with every item where exact match moves only when an answer "
            "turns right.)")


def score(predictions: list[str], items: list[dict], answer_logprob: list[float] | None = None) -> dict:
    """Per-item exact match / ROUGE-L and their task-clustered means.

    items[i] has "answers" (list of str) and "task" (the cluster). Returns n, n_tasks, em,
    em_se, rouge_l, rouge_l_se (clustered SEs), em_items, rouge_l_items, predictions; with
    answer_logprob (per item, from the harness: ``Evaluator._answer_logprobs``) also
    answer_logprob, answer_logprob_se and answer_logprob_items.
    """
    tasks = [it["task"] for it in items]
    out: dict = {"n": len(items), "n_tasks": len(set(tasks)), "predictions": predictions}
    out["em_items"] = [exact_match(p, it["answers"]) for p, it in zip(predictions, items)]
    out["rouge_l_items"] = [rouge_l(p, it["answers"]) for p, it in zip(predictions, items)]
    if answer_logprob is not None:
        out[f"{LIKELIHOOD}_items"] = [float(v) for v in answer_logprob]
    out["tasks"] = tasks
    for key in metrics_of({"": out}):
        out[key], out[f"{key}_se"] = clustered_mean_se(out[f"{key}_items"], tasks)
    return out


def metrics_of(results: dict) -> tuple[str, ...]:
    """The metrics every condition of a table has: exact match, ROUGE-L, and the answer likelihood
    where the harness scored it."""
    has_likelihood = bool(results) and all(f"{LIKELIHOOD}_items" in r for r in results.values())
    return METRICS + ((LIKELIHOOD,) if has_likelihood else ())


def score_predictions(part: dict, examples: Sequence) -> dict:
    """{condition: ``score(...)``} from the harness's run of a ``RunSplit`` (``Evaluator.run_benchmark``):
    each adapter's answers, in the order of ``examples`` (one per item: each item has its own
    description), scored by exact match and ROUGE-L."""
    items = [{"task": ex.task, "answers": list(ex.gold)} for ex in examples]
    answers: dict[str, dict[str, str]] = {}
    likelihood: dict[str, dict[str, float]] = {}
    for row in part["predictions"]:
        answers.setdefault(row["adapter"], {})[row["id"]] = row["prediction"]
        if LIKELIHOOD in row:
            likelihood.setdefault(row["adapter"], {})[row["id"]] = row[LIKELIHOOD]
    return {name: score([answers[name][ex.id] for ex in examples], items,
                        [likelihood[name][ex.id] for ex in examples] if name in likelihood else None)
            for name in part["scores"]}


def paired_differences(results: dict, reference: str = "t2l") -> dict[str, dict]:
    """reference minus each other condition, item by item, task-clustered: {name: {em, em_se,
    rouge_l, rouge_l_se, [answer_logprob, answer_logprob_se,] em_only_reference, em_only_other}} (the last two: how many items only
    the reference / only that condition answers exactly, what the exact-match difference rests on).

    The conditions answer the same items, so the paired difference removes the spread in item
    difficulty that both share; clustering by task keeps one easy task from counting as many
    independent wins.
    """
    if reference not in results:
        return {}
    ref, out = results[reference], {}
    for name, r in results.items():
        if name == reference:
            continue
        row = {}
        for key in metrics_of({reference: ref, name: r}):
            row[key], row[f"{key}_se"] = paired_difference(ref[f"{key}_items"], r[f"{key}_items"], ref["tasks"])
        # The items the exact-match difference rests on: right for one of the two only.
        row["em_only_reference"] = sum(a > b for a, b in zip(ref["em_items"], r["em_items"]))
        row["em_only_other"] = sum(b > a for a, b in zip(ref["em_items"], r["em_items"]))
        out[name] = row
    return out


def in_cse(mean: float, se: float) -> str:
    """The difference in clustered standard errors, as the tables print it ('+2.3 cSE')."""
    return f"{mean / se:+.1f} cSE" if se > 0 and not math.isnan(se) else "n/a"


def markdown_table(title: str, results: dict, training: dict[str, str] | None = None) -> str:
    """The condition table and the paired-difference table of one split.

    training: condition -> how it was trained (``TrainingStatus.describe()``); conditions not
    in it (the base model) show '-'.
    """
    training = training or {}
    n_tasks = max((r.get("n_tasks", 0) for r in results.values()), default=0)
    metrics = metrics_of(results)
    heads = " | ".join(METRIC_NAMES[m] for m in metrics)
    lines = [f"**{title}** ({n_tasks} tasks)", "",
             f"| condition | items | {heads} | training |", "|---|---:|" + "---:|" * len(metrics) + "---|"]
    for name, r in results.items():
        cells = " | ".join(_pm(r[m], r[f"{m}_se"]) for m in metrics)
        lines.append(f"| {CONDITIONS.get(name, name)} | {r['n']} | {cells} | {_trained(training.get(name))} |")
    diffs = paired_differences(results)
    if diffs:
        lines += ["", f"| (c) T2L minus | {heads} | exact: only (c) / only it |",
                  "|---|" + "---:|" * len(metrics) + "---:|"]
        for name, d in diffs.items():
            cells = " | ".join(f"{_pm(d[m], d[f'{m}_se'], '+')} ({in_cse(d[m], d[f'{m}_se'])})"
                               for m in metrics if m in d)
            lines.append(f"| {CONDITIONS.get(name, name)} | {cells} | {d['em_only_reference']} / {d['em_only_other']} |")
    return "\n".join(lines)


def per_task_table(title: str, results: dict) -> str:
    """Exact match per task and condition, and how many items no condition answers exactly:
    where a split can show a difference between conditions at all, and which tasks make it."""
    names = list(results)
    first = results[names[0]]
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(first["tasks"]):
        by_task.setdefault(task, []).append(i)
    lines = [f"**{title}, exact match per task**", "",
             "| task | items | " + " | ".join(CONDITIONS.get(n, n).split(" ", 1)[0] for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for task, idx in by_task.items():
        cells = [sum(results[n]["em_items"][i] for i in idx) / len(idx) for n in names]
        lines.append(f"| {task} | {len(idx)} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    unanswered = sum(all(results[n]["em_items"][i] == 0 for n in names) for i in range(first["n"]))
    dead = sum(all(results[n]["em_items"][i] == 0 for n in names for i in idx) for idx in by_task.values())
    lines += ["", f"No condition answers {unanswered} of {first['n']} items exactly ({dead} of {len(by_task)} "
                  "tasks score 0 under every condition): the differences above rest on the other items."]
    return "\n".join(lines)


def _pm(mean: float, se: float, sign: str = "") -> str:
    """'0.250 ± 0.031'; a clustered SE needs two tasks, so one task gives '± n/a'."""
    return f"{mean:{sign}.3f} ± {'n/a' if math.isnan(se) else f'{se:.3f}'}"


def _trained(text: str | None) -> str:
    if not text:
        return "-"
    return f"**{text}**" if text.startswith(("cut short", "DIVERGED")) else text


def render(tables: dict[str, dict], training: dict[str, str] | None = None) -> str:
    """All tables with a warning line first when a condition's run was cut short or diverged."""
    cut = sorted({CONDITIONS.get(n, n) for n, t in (training or {}).items() if t and t.startswith("cut short")})
    head = [f"**Warning: cut short by trainer.max_time, results below the recipe's budget: {', '.join(cut)}**"] if cut else []
    bad = sorted({CONDITIONS.get(n, n) for n, t in (training or {}).items() if t and t.startswith("DIVERGED")})
    if bad:
        head.append(f"**Warning: training diverged (its loss ended far above where it started), these rows are "
                    f"untrained adapters: {', '.join(bad)}**")
    return "\n\n".join(head + [markdown_table(t, r, training) for t, r in tables.items()])


def time_breakdown(seconds: dict[str, float], total: float | None = None) -> str:
    """Where a run's wall time went: one line per part (``seconds``: part -> wall seconds) with its
    share of ``total``; what the parts do not cover of ``total`` is shown as 'other'."""
    def format_seconds(value: float) -> str:
        minutes, secs = divmod(int(round(value)), 60)
        return f"{minutes} min {secs} s" if minutes else f"{value:.1f} s"

    parts = dict(seconds)
    if total is None:
        total = sum(parts.values())
    else:
        parts["other (setup, checks, writing files)"] = max(0.0, total - sum(parts.values()))
    lines = [f"  {name:<60} {format_seconds(s):>11}  {100 * s / total if total else 0:5.1f}%"
             for name, s in parts.items()]
    return "\n".join([f"time: {format_seconds(total)} in all"] + lines)


def report_markdown(rendered: str, tables: dict[str, dict]) -> str:
    """report.md: the tables as ``render`` gave them, the footnote, then exact match per task."""
    per_task = "\n\n".join(per_task_table(title, res) for title, res in tables.items() if res)
    return rendered + "\n\n" + FOOTNOTE + "\n\n" + per_task + "\n"


def write_report(out_dir: Path, tables: dict[str, dict], items: dict[str, list[dict]],
                 training: dict[str, str] | None = None, seconds: dict[str, float] | None = None) -> str:
    """Write report.md and report.json (per-item predictions, training per condition, the time
    breakdown ``seconds``: part -> wall seconds); return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render(tables, training)
    payload: dict = {"training": dict(training or {}), "tables": {},
                     "seconds": {k: round(v, 2) for k, v in (seconds or {}).items()}}
    for title, res in tables.items():
        keys = ("n", "n_tasks") + tuple(k for m in metrics_of(res) for k in (m, f"{m}_se"))
        section = {name: {k: r[k] for k in keys} for name, r in res.items()}
        section["items"] = [
            {"task": it["task"], "answers": it["answers"], **{n: r["predictions"][i] for n, r in res.items()},
             **{f"{n}:{LIKELIHOOD}": r[f"{LIKELIHOOD}_items"][i] for n, r in res.items() if f"{LIKELIHOOD}_items" in r}}
            for i, it in enumerate(items[title])]
        payload["tables"][title] = section
    # Both built before either is written; each replaces its older file whole, or not at all.
    text = report_markdown(md, tables)
    with atomic_file(out_dir / "report.md") as tmp:
        tmp.write_text(text)
    with atomic_file(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    return md


def rescore(report_json: Path, exclude_tasks: Sequence[str] = ()) -> tuple[dict[str, dict], dict[str, str]]:
    """Rebuild the tables (with paired differences) and the training column from a saved report.json.

    exclude_tasks: tasks whose items are left out of every table, e.g. to see how much of a
    difference rests on a few tasks (multiple choice at chance); each must be in the report.
    """
    data = json.loads(Path(report_json).read_text())
    if "tables" not in data:  # reports written before the training column: titles at the top level
        data = {"tables": data, "training": {}}
    known = {it["task"] for section in data["tables"].values() for it in section["items"]}
    excluded = set(exclude_tasks)
    unknown = sorted(excluded - known)
    if unknown:
        raise T2LError(f"{report_json}: no items of task(s) {', '.join(unknown)} to exclude "
                       f"(its tasks: {', '.join(sorted(known))})")
    tables = {}
    for title, section in data["tables"].items():
        items = [it for it in section["items"] if it["task"] not in excluded]
        if not items:
            continue
        # in the table's (a)-(h) order, also for a condition added later (benchmarks/add_baseline.py)
        names = sorted((n for n in section if n != "items"), key=lambda n: _ORDER.get(n, len(_ORDER)))
        tables[title] = {name: score([it[name] for it in items], items,
                                     [it[f"{name}:{LIKELIHOOD}"] for it in items]
                                     if all(f"{name}:{LIKELIHOOD}" in it for it in items) else None)
                         for name in names}
    return tables, data.get("training", {})


def main(argv: Sequence[str] | None = None) -> int:
    """Re-print the tables of saved report.json files, optionally without some tasks."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m t2l_framework.eval.sni_report", description=main.__doc__,
        epilog="example: python -m t2l_framework.eval.sni_report runs/smollm2_demo_long/report.json "
               "--exclude-tasks lol_701,lol_706,lol_710,lol_726")
    parser.add_argument("reports", nargs="+", type=Path, metavar="REPORT_JSON")
    parser.add_argument("--exclude-tasks", default="", metavar="T1,T2",
                        help="tasks left out of every table (comma-separated task ids)")
    args = parser.parse_args(argv)
    exclude = [t.strip() for t in args.exclude_tasks.split(",") if t.strip()]
    for path in args.reports:
        try:
            tables, training = rescore(path, exclude)
        except T2LError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (OSError, ValueError, KeyError) as e:  # unreadable, not JSON, or not a report
            print(f"error: {path}: not a readable report.json ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
        if exclude:
            print(f"without the items of {', '.join(exclude)}\n")
        print(render(tables, training))
        for title, res in tables.items():
            print("\n" + per_task_table(title, res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
