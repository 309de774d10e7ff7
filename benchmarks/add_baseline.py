"""Add condition (e), a multi-task LoRA trained *after* a T2L run, to that run's end-of-training table.

A T2L lever run is often trained first, without a baseline (its table leaves out (e)), and the
multi-task LoRA of the same work afterwards. This scores the LoRA on the run's own splits with
`t2l eval` (the same pipeline as the table), writes its answers into RUN/report.json as
condition `mt_lora` with its training column, and re-writes report.md; `benchmarks/scaling_map.py
--record RUN` can then record the run as a map cell. As a check it scores (c) T2L again and says
on how many items its answers equal the table's (greedy decoding: all of them, unless batching
moves a bfloat16 tie).

    python benchmarks/add_baseline.py runs/t2l1728_seed42 runs/mt1728_seed42
    python benchmarks/add_baseline.py runs/t2l1728_seed42 runs/mt1728_seed42 --from-eval runs/t2l1728_seed42/eval

The T2L run's recipe must name the LoRA run as its `eval.baseline_adapter`, so that `--record`
finds it (the same check as a table trained with it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from t2l_framework.assembly.evaluate import RUN_SPLITS  # noqa: E402
from t2l_framework.atomic import atomic_file  # noqa: E402
from t2l_framework.eval.sni_report import LIKELIHOOD, render, report_markdown, rescore  # noqa: E402
from t2l_framework.training.training_status import TrainingStatus  # noqa: E402

BASELINE = "mt_lora"


def merge(t2l_run: Path, predictions: Path, mt_run: Path) -> dict[str, int]:
    """Write the baseline's answers from a `t2l eval` predictions.jsonl (adapters t2l and mt_lora on
    sni_seen / sni_unseen) into t2l_run/report.json and report.md. Returns, per benchmark, on how
    many items the eval's (c) answers equal the report's."""
    report_file = t2l_run / "report.json"
    report = json.loads(report_file.read_text())
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    agree = {}
    for bench, (_, title) in RUN_SPLITS.items():
        if title not in report["tables"]:
            continue
        items = report["tables"][title]["items"]
        got = {a: [r for r in rows if r["benchmark"] == bench and r["adapter"] == a] for a in ("t2l", BASELINE)}
        for adapter, answers in got.items():
            if len(answers) != len(items):
                raise SystemExit(f"{predictions}: {len(answers)} '{adapter}' answers on {bench}, the report has "
                                 f"{len(items)} items; score both with `t2l eval {t2l_run} --benchmarks "
                                 f"sni_seen,sni_unseen --adapters t2l,{BASELINE}=...` (the run's recipe settings)")
        agree[bench] = sum(r["prediction"] == it["t2l"] for r, it in zip(got["t2l"], items))
        for it, r in zip(items, got[BASELINE]):
            it[BASELINE] = r["prediction"]
            if LIKELIHOOD in r:
                it[f"{BASELINE}:{LIKELIHOOD}"] = r[LIKELIHOOD]
        report["tables"][title][BASELINE] = {"n": len(items)}
    status = TrainingStatus.load(mt_run)
    report["training"][BASELINE] = status.describe() if status else f"unknown (no training status in {mt_run})"
    with atomic_file(report_file) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    tables, training = rescore(report_file)
    with atomic_file(t2l_run / "report.md") as tmp:
        tmp.write_text(report_markdown(render(tables, training), tables))
    return agree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("t2l_run", type=Path)
    p.add_argument("mt_run", type=Path, help="the multi-task LoRA run folder (its adapter/ is scored)")
    p.add_argument("--from-eval", type=Path, default=None, metavar="EVAL_DIR",
                   help="use the predictions.jsonl of an earlier `t2l eval` instead of scoring again")
    args = p.parse_args(argv)
    if not (args.t2l_run / "report.json").is_file():
        raise SystemExit(f"{args.t2l_run}: no report.json (a T2L run with its end-of-training table)")
    if not (args.mt_run / "adapter" / "adapter_config.json").is_file():
        raise SystemExit(f"{args.mt_run}: no adapter/ (a finished multi-task LoRA run)")
    eval_dir = args.from_eval
    if eval_dir is None:
        from t2l_framework.assembly.evaluate import evaluate

        eval_dir = args.t2l_run / "eval_baseline"
        evaluate(args.t2l_run, ["sni_seen", "sni_unseen"], ["t2l", f"{BASELINE}={args.mt_run / 'adapter'}"],
                 output=eval_dir)
    agree = merge(args.t2l_run, eval_dir / "predictions.jsonl", args.mt_run)
    for bench, n in agree.items():
        print(f"{bench}: (c) answers equal the table's on {n} items")
    print((args.t2l_run / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
