"""The end-of-training table: scoring, standard errors and paired differences."""

import json

import pytest

from t2l_framework.eval.sni_report import markdown_table, paired_differences, rescore, write_report
from t2l_framework.eval.text_metrics import exact_match, normalize, rouge_l


def test_exact_match_and_rouge_normalise_case_and_punctuation():
    assert normalize("  The  Answer. ") == "the answer"
    assert exact_match("Stereotype.", ["anti-stereotype", "stereotype"]) == 1.0
    assert exact_match("stereotypes", ["stereotype"]) == 0.0
    assert rouge_l("the red car", ["a red car"]) == pytest.approx(2 / 3)


def _result(em):
    n = len(em)
    return {"n": n, "em": sum(em) / n, "em_se": 0.0, "rouge_l": sum(em) / n, "rouge_l_se": 0.0,
            "em_items": em, "rouge_l_items": em, "predictions": ["x"] * n}


def test_paired_differences_use_item_pairs():
    results = {"t2l": _result([1, 1, 0, 1]), "base": _result([0, 1, 0, 0])}
    d = paired_differences(results)["base"]
    assert d["em"] == pytest.approx(0.5)
    # diffs 1,0,0,1: sd = 0.577, se = 0.289
    assert d["em_se"] == pytest.approx(0.2887, abs=1e-3)
    table = markdown_table("T", results)
    assert "| (c) T2L minus |" in table and "+0.500 ± 0.289 (+1.7 SE)" in table


def test_report_round_trips_through_json(tmp_path):
    items = [{"task": "t", "answers": ["yes"]}, {"task": "t", "answers": ["no"]}]
    results = {"t2l": {**_result([1, 1]), "predictions": ["yes", "no"]},
               "base": {**_result([0, 1]), "predictions": ["maybe", "no"]}}
    write_report(tmp_path, {"Seen": results}, {"Seen": items})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["Seen"]["items"][0] == {"task": "t", "answers": ["yes"], "t2l": "yes", "base": "maybe"}
    again = rescore(tmp_path / "report.json")["Seen"]
    assert again["t2l"]["em"] == 1.0 and again["base"]["em"] == 0.5
