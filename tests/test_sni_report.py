"""The end-of-training table: scoring, task-clustered standard errors and paired differences."""

import json
import math

import pytest

from t2l_framework.eval.sni_report import markdown_table, paired_differences, render, rescore, score, write_report
from t2l_framework.eval.text_metrics import exact_match, normalize, rouge_l


def test_exact_match_and_rouge_normalise_case_and_punctuation():
    assert normalize("  The  Answer. ") == "the answer"
    assert exact_match("Stereotype.", ["anti-stereotype", "stereotype"]) == 1.0
    assert exact_match("stereotypes", ["stereotype"]) == 0.0
    assert rouge_l("the red car", ["a red car"]) == pytest.approx(2 / 3)


def _items(tasks, answer="yes"):
    return [{"task": t, "answers": [answer]} for t in tasks]


def test_scores_are_clustered_by_task():
    # Task a: all right, task b: all wrong. Four items but two clusters: the clustered SE is
    # sqrt(G/(G-1) * sum_g s_g^2) / n = sqrt(2 * (1 + 1)) / 4 = 0.5, not the item SE 0.289.
    items = _items(["a", "a", "b", "b"])
    r = score(["yes", "yes", "no", "no"], items)
    assert (r["n"], r["n_tasks"], r["em"]) == (4, 2, 0.5)
    assert r["em_se"] == pytest.approx(0.5)
    assert r["em_items"] == [1.0, 1.0, 0.0, 0.0] and r["tasks"] == ["a", "a", "b", "b"]


def test_paired_differences_are_paired_and_clustered():
    items = _items(["a", "a", "b", "b", "c", "c"])
    results = {"t2l": score(["yes", "yes", "yes", "no", "no", "no"], items),
               "base": score(["no", "yes", "no", "no", "no", "no"], items)}
    d = paired_differences(results)["base"]
    # diffs 1,0 | 1,0 | 0,0: mean 1/3; cluster sums of residuals 1/3, 1/3, -2/3
    # var = 3/2 * (1/9 + 1/9 + 4/9) / 36 = 1/36 -> se = 1/6
    assert d["em"] == pytest.approx(1 / 3)
    assert d["em_se"] == pytest.approx(1 / 6)
    table = markdown_table("T", results)
    assert "| (c) T2L minus |" in table and "+0.333 ± 0.167 (+2.0 cSE)" in table
    assert "**T** (3 tasks)" in table


def test_one_task_has_no_clustered_se():
    r = score(["yes", "no"], _items(["a", "a"]))
    assert r["em"] == 0.5 and math.isnan(r["em_se"])
    assert "0.500 ± n/a" in markdown_table("T", {"t2l": r, "base": score(["no", "no"], _items(["a", "a"]))})


def test_training_column_and_cut_short_warning():
    items = _items(["a", "b"])
    results = {"base": score(["no", "yes"], items), "t2l": score(["yes", "yes"], items)}
    training = {"t2l": "cut short at step 5 of 10 by max_time 00:00:01:00 (40 examples, 1 min 0 s)"}
    md = render({"Seen": results}, training)
    assert md.startswith("**Warning: cut short by trainer.max_time")
    assert "| (a) base model | 2 | 0.500 ± 0.500 | 0.500 ± 0.500 | - |" in md
    assert "| **cut short at step 5 of 10 by max_time 00:00:01:00 (40 examples, 1 min 0 s)** |" in md
    assert "Warning" not in render({"Seen": results}, {"t2l": "10 of 10 steps (80 examples), 2 min 0 s"})


def test_report_round_trips_through_json(tmp_path):
    items = [{"task": "t", "answers": ["yes"]}, {"task": "u", "answers": ["no"]}]
    # in the table's order, as final_report writes them (rescore puts them in that order)
    results = {"base": score(["maybe", "no"], items), "t2l": score(["yes", "no"], items)}
    training = {"t2l": "4 of 4 steps (32 examples), 9 s"}
    md = write_report(tmp_path, {"Seen": results}, {"Seen": items}, training)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["tables"]["Seen"]["items"][0] == {"task": "t", "answers": ["yes"], "base": "maybe", "t2l": "yes"}
    assert saved["training"] == training
    tables, again_training = rescore(tmp_path / "report.json")
    assert tables["Seen"]["t2l"]["em"] == 1.0 and tables["Seen"]["base"]["em"] == 0.5
    assert render(tables, again_training) == md


def test_rescore_reads_reports_written_before_the_training_column(tmp_path):
    old = {"Seen": {"t2l": {"n": 1}, "items": [{"task": "t", "answers": ["yes"], "t2l": "yes"}]}}
    (tmp_path / "report.json").write_text(json.dumps(old))
    tables, training = rescore(tmp_path / "report.json")
    assert tables["Seen"]["t2l"]["em"] == 1.0 and training == {}


def test_paired_table_counts_the_items_each_side_alone_answers():
    items = _items(["a", "a", "b", "b"])
    results = {"t2l": score(["yes", "yes", "no", "yes"], items), "base": score(["no", "yes", "yes", "no"], items)}
    d = paired_differences(results)["base"]
    assert (d["em_only_reference"], d["em_only_other"]) == (2, 1)
    assert "| 2 / 1 |" in markdown_table("T", results)


def test_per_task_table_and_the_items_no_condition_answers(tmp_path):
    from t2l_framework.eval.sni_report import per_task_table

    items = _items(["a", "a", "b", "b", "c"])
    results = {"t2l": score(["yes", "no", "no", "no", "no"], items),
               "mt_lora": score(["yes", "yes", "no", "no", "no"], items)}
    table = per_task_table("Unseen", results)
    assert "| task | items | (c) | (e) |" in table
    assert "| a | 2 | 0.50 | 1.00 |" in table and "| b | 2 | 0.00 | 0.00 |" in table
    assert "No condition answers 3 of 5 items exactly (2 of 3 tasks score 0 under every condition)" in table
    write_report(tmp_path, {"Unseen": results}, {"Unseen": items})
    assert "| a | 2 | 0.50 | 1.00 |" in (tmp_path / "report.md").read_text()


def test_answer_likelihood_column_is_clustered_paired_and_round_trips(tmp_path):
    items = _items(["a", "a", "b", "b"])
    results = {"t2l": score(["x", "x", "x", "x"], items, [-1.0, -2.0, -1.5, -0.5]),
               "base": score(["x", "x", "x", "x"], items, [-3.0, -2.0, -2.5, -2.5])}
    assert results["t2l"]["answer_logprob"] == pytest.approx(-1.25)
    d = paired_differences(results)["base"]
    # per item: +2, 0, +1, +2; the paired difference is their mean, clustered by task
    assert d["answer_logprob"] == pytest.approx(1.25)
    assert d["answer_logprob_se"] > 0 and d["em"] == 0.0
    md = markdown_table("T", results)
    assert "| condition | items | exact match | ROUGE-L | answer log-lik (nats/token) | training |" in md
    assert f"+1.250 ± {d['answer_logprob_se']:.3f} (+{1.25 / d['answer_logprob_se']:.1f} cSE)" in md
    write_report(tmp_path, {"T": results}, {"T": items})
    saved = json.loads((tmp_path / "report.json").read_text())["tables"]["T"]
    assert saved["items"][1]["t2l:answer_logprob"] == -2.0 and saved["base"]["answer_logprob"] == pytest.approx(-2.5)
    tables, _ = rescore(tmp_path / "report.json")
    assert tables["T"]["t2l"]["answer_logprob_items"] == [-1.0, -2.0, -1.5, -0.5]
    # a table where one condition lacks it (an older report, a plugin) shows the two text metrics only
    mixed = {"t2l": results["t2l"], "base": score(["x"] * 4, items)}
    assert "answer log-lik" not in markdown_table("T", mixed) and "answer_logprob" not in paired_differences(mixed)["base"]


def test_rescore_without_some_tasks_drops_their_items_from_every_table(tmp_path, capsys):
    from t2l_framework.eval.sni_report import main

    items = _items(["a", "a", "b", "b"])
    results = {"t2l": score(["yes", "yes", "no", "no"], items), "base": score(["no", "no", "yes", "yes"], items)}
    write_report(tmp_path, {"Unseen": results}, {"Unseen": items})
    whole, _ = rescore(tmp_path / "report.json")
    assert whole["Unseen"]["t2l"]["em"] == 0.5
    without_b, _ = rescore(tmp_path / "report.json", exclude_tasks=["b"])
    assert without_b["Unseen"]["t2l"]["em"] == 1.0 and without_b["Unseen"]["base"]["em"] == 0.0
    assert without_b["Unseen"]["t2l"]["tasks"] == ["a", "a"]
    assert main([str(tmp_path / "report.json"), "--exclude-tasks", "b"]) == 0
    assert "without the items of b" in capsys.readouterr().out
    # a task the report does not hold is one clear error, not an empty table
    assert main([str(tmp_path / "report.json"), "--exclude-tasks", "zz"]) == 1
    assert "no items of task(s) zz" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert main([str(tmp_path / "broken.json")]) == 1
    assert "not a readable report.json" in capsys.readouterr().err
