"""benchmarks/add_baseline.py: a multi-task LoRA trained after a T2L run becomes its table's (e)."""

import json

import pytest

from t2l_framework.eval.sni_report import rescore, score, write_report
from t2l_framework.training.training_status import TrainingStatus
from tests.benchmark_scripts import load_benchmark


def _add_baseline():
    return load_benchmark("add_baseline")


def _run(tmp_path):
    items = [{"task": t, "answers": ["yes"]} for t in ("a", "a", "b", "b")]
    results = {"t2l": score(["yes", "no", "yes", "no"], items), "base": score(["no"] * 4, items)}
    run = tmp_path / "t2l"
    write_report(run, {"Tasks never seen in training": results}, {"Tasks never seen in training": items})
    mt = tmp_path / "mt"
    TrainingStatus(mode="lora", steps=10, max_steps=10, examples=80, seconds=61.0).save(mt)
    return run, mt


def _predictions(path, t2l, mt):
    rows = [{"benchmark": "sni_unseen", "adapter": a, "id": f"i{j}", "prediction": p, "answer_logprob": -1.0}
            for a, answers in (("t2l", t2l), ("mt_lora", mt)) for j, p in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_baseline_answers_join_the_table_as_condition_e(tmp_path):
    m = _add_baseline()
    run, mt = _run(tmp_path)
    preds = _predictions(tmp_path / "predictions.jsonl", ["yes", "no", "yes", "yes"], ["no", "yes", "yes", "yes"])
    agree = m.merge(run, preds, mt)
    assert agree == {"sni_unseen": 3}  # the eval's (c) differs from the table's on the last item
    tables, training = rescore(run / "report.json")
    unseen = tables["Tasks never seen in training"]
    assert unseen["mt_lora"]["em"] == 0.75 and unseen["t2l"]["em"] == 0.5  # (c) stays the table's own
    assert unseen["mt_lora"]["answer_logprob"] == -1.0
    assert training["mt_lora"].startswith("10 of 10 steps")
    assert list(unseen) == ["base", "t2l", "mt_lora"]  # (e) in its place in the table, not last
    assert "(e) multi-task LoRA" in (run / "report.md").read_text()


def test_answers_for_other_items_are_refused_with_the_command_to_run(tmp_path):
    m = _add_baseline()
    run, mt = _run(tmp_path)
    preds = _predictions(tmp_path / "predictions.jsonl", ["yes"] * 3, ["no"] * 3)
    with pytest.raises(SystemExit, match="3 't2l' answers on sni_unseen, the report has 4 items"):
        m.merge(run, preds, mt)
    assert "mt_lora" not in json.loads((run / "report.json").read_text())["training"]  # nothing written
