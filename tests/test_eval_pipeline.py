"""One evaluation pipeline: the end-of-training table and `t2l eval RUN --benchmarks sni_seen,sni_unseen`
score the run's own held-out items with the same harness, so they give the same answers item by item."""

from __future__ import annotations

import json

import pytest

from t2l_framework.assembly import fit
from t2l_framework.cli import main
from tests.tiny_world import build_world

# `t2l eval` adapter -> the table's condition, in the table's order
CONDITIONS = {"base": "base", "base+description": "base+description", "t2l": "t2l",
              "other_description": "t2l_other_task_description", "random_description": "t2l_random_description",
              "generic_description": "t2l_generic_description"}
SPLITS = {"sni_seen": "Training tasks, held-out instances and descriptions",
          "sni_unseen": "Tasks never seen in training"}


def _recording(monkeypatch) -> list:
    """greedy_decode that records every row it is given: (prompt ids, a checksum of the row's LoRA)."""
    import t2l_framework.runtime.greedy as greedy

    calls, real = [], greedy.greedy_decode

    def decode(model, prompts, rows=None, *args, **kwargs):
        for prompt, w in zip(prompts, rows or [None] * len(prompts)):
            calls.append((tuple(prompt), None if w is None else round(sum(
                float(t.double().abs().sum()) for f in (w.A, w.B) for t in f.values()), 6)))
        return real(model, prompts, rows, *args, **kwargs)

    monkeypatch.setattr(greedy, "greedy_decode", decode)
    return calls


def test_end_of_training_table_and_t2l_eval_give_the_same_numbers(tmp_path, monkeypatch, capsys):
    world = build_world(tmp_path / "world")
    import t2l_framework.assembly.final_report as final_report

    decoded, real_report = _recording(monkeypatch), final_report.final_report

    def report(*args, **kwargs):  # the table's rows only, not validation's
        decoded.clear()
        return real_report(*args, **kwargs)

    monkeypatch.setattr(final_report, "final_report", report)
    run = fit(str(world["recipe"]), ["trainer.max_steps=6", "training.run_name=same", "eval.final_report=true"])
    table_rows = list(decoded)
    decoded.clear()
    tables = json.loads((run / "report.json").read_text())["tables"]
    assert main(["eval", str(run), "--benchmarks", "sni_seen,sni_unseen", "--adapters", ",".join(CONDITIONS),
                 "--dtype", "float32", "--no-cache", "-o", str(tmp_path / "eval")]) == 0
    # the decoder got the same rows, in the same batches: prompts (description prompt, truncation)
    # and adapters (descriptions, controls) alike; one row per item and condition
    assert table_rows == decoded and len(table_rows) == (16 + 8) * len(CONDITIONS)
    assert len({w for _, w in table_rows}) > 2  # (c), (d), (f), (g) are different adapters
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    for bench, title in SPLITS.items():
        table = tables[title]
        assert [k for k in table if k != "items"] == list(CONDITIONS.values())
        items = table["items"]
        for adapter, condition in CONDITIONS.items():
            answers = [r["prediction"] for r in rows if r["benchmark"] == bench and r["adapter"] == adapter]
            assert answers == [it[condition] for it in items], (bench, adapter)
            value = results["scores"][adapter][bench]
            assert value["n"] == table[condition]["n"] == len(items)
            assert value["score"] == pytest.approx(table[condition]["rouge_l"], abs=1e-6)
            # the reference answers' likelihood: the same per item in both, and finite
            likelihood = [r["answer_logprob"] for r in rows if r["benchmark"] == bench and r["adapter"] == adapter]
            assert likelihood == pytest.approx([it[f"{condition}:answer_logprob"] for it in items], abs=1e-6)
            assert all(v < 0 for v in likelihood)
            assert value["metrics"]["answer_logprob"]["score"] == pytest.approx(table[condition]["answer_logprob"])
        # the run's own split: its tasks, not the bundle's
        tasks = {it["task"] for it in items}
        assert tasks == ({"toy_4", "toy_5"} if bench == "sni_unseen" else {"toy_0", "toy_1", "toy_2", "toy_3"})
    # the fast check without generating scores the same reference answers the same way
    from t2l_framework.assembly.evaluate import answer_likelihoods

    fast = answer_likelihoods(run, list(SPLITS), list(CONDITIONS), dtype="float32", use_cache=False,
                              show_progress=False)
    for bench, title in SPLITS.items():
        items = tables[title]["items"]
        assert fast[bench]["tasks"] == [it["task"] for it in items]
        for adapter, condition in CONDITIONS.items():
            assert fast[bench][adapter] == pytest.approx([it[f"{condition}:answer_logprob"] for it in items], abs=1e-6)


def test_no_answer_loglik_scores_the_answers_only(tmp_path):
    from tests.tiny_world import build_trained_world

    world = build_trained_world(tmp_path / "world", "plain")
    for flag, has in (("--no-answer-loglik", False), ("--answer-loglik", True)):
        out = tmp_path / flag
        assert main(["eval", str(world["run"]), "--benchmarks", "sni_unseen", "--adapters", "base,t2l",
                     "--dtype", "float32", "--no-cache", flag, "-o", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert ("answer_logprob" in results["scores"]["t2l"]["sni_unseen"]["metrics"]) is has
        assert ("answer_logprob" in results["benchmarks"]["sni_unseen"]["metrics"]) is has
        assert ("answer_logprob" in (out / "results.md").read_text()) is has


def test_likelihood_only_is_the_tables_likelihood_paired_against_t2l(tmp_path, capsys):
    from t2l_framework.eval.stats import paired_difference
    from tests.tiny_world import build_world

    world = build_world(tmp_path / "world")
    run = fit(str(world["recipe"]), ["trainer.max_steps=4", "training.run_name=quick", "eval.final_report=true"])
    items = json.loads((run / "report.json").read_text())["tables"][SPLITS["sni_unseen"]]["items"]
    out = tmp_path / "ll"
    assert main(["eval", str(run), "--likelihood-only", "--adapters", "base,t2l,random_description",
                 "--dtype", "float32", "-o", str(out)]) == 0
    saved = json.loads((out / "likelihood.json").read_text())["sni_unseen"]  # sni_unseen by default
    assert saved["tasks"] == [it["task"] for it in items]
    for adapter, condition in (("base", "base"), ("t2l", "t2l"), ("random_description", "t2l_random_description")):
        assert saved[adapter] == pytest.approx([it[f"{condition}:answer_logprob"] for it in items], abs=1e-6)
    diff, se = paired_difference(saved["t2l"], saved["random_description"], saved["tasks"])
    table = (out / "likelihood.md").read_text()
    assert f"| random_description | " in table and f"| {diff:+.3f} ± {se:.3f} | {diff / se:+.1f} |" in table
    assert "t2l minus it" in capsys.readouterr().out
    # a benchmark without reference answers: one clear error (bad input: exit 1, one line)
    assert main(["eval", str(run), "--likelihood-only", "--benchmarks", "arc_easy", "--adapters", "base",
                 "--dtype", "float32", "-o", str(out)]) == 1
    assert "has no reference answers" in capsys.readouterr().err
