"""`t2l eval` end to end on a tiny trained run: every benchmark with --limit 2, mixed adapters,
the JSON / table / PNG outputs and the result cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2l_framework.cli import main
from t2l_framework.assembly import get_benchmarks
from t2l_framework.eval.harness import pick_descriptions
from tests.tiny_world import build_trained_world

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = build_trained_world(tmp_path_factory.mktemp("eval_world"), "evalrun", steps=3)
    from t2l_framework.assembly import load_runtime

    # A PEFT folder holding exactly the T2L adapter that arc_easy's first description makes:
    # evaluated as a separate adapter it must reproduce that T2L unit's numbers.
    (arc,) = get_benchmarks(["arc_easy"])
    first = pick_descriptions(arc.descriptions("arc_easy"), 2, 0, "arc_easy")[0]
    runtime = load_runtime(world["run"], dtype="float32")  # compared with eval's numbers below
    world["same_as_t2l"] = runtime.export([first], [world["root"] / "same_as_t2l"])[0]
    return world


def _eval(world, out: Path, *extra: str) -> int:
    return main(["eval", str(world["run"]), "--dtype", "float32", "--limit", "2", "--n-descriptions", "2", "--max-new-tokens", "6",
                 "--code-timeout", "5", "-o", str(out), "--cache-dir", str(world["root"] / "cache"), *extra])


def test_eval_writes_json_table_plot_and_reuses_the_cache(world, tmp_path, capsys):
    adapters = f"base,base+description,t2l,same={world['same_as_t2l']}"
    assert _eval(world, tmp_path / "a", "--benchmarks", "all", "--adapters", adapters, "--protocol", "chat") == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    names = [b.name for b in get_benchmarks(["all"])]
    assert list(results["benchmarks"]) == names and len(names) == 11
    assert list(results["scores"]) == ["base", "base+description", "t2l", "same"]
    for adapter, per_bench in results["scores"].items():
        assert set(per_bench) == set(names)
        for bench, value in per_bench.items():
            assert value["n"] == 2 and 0.0 <= value["score"] <= 1.0, (adapter, bench)
            # a run's sni_unseen: its own held-out items, each asked with its own description (one slot)
            slots = 2 if adapter in ("base+description", "t2l") and bench != "sni_unseen" else 1
            assert len(value["per_description"]) == slots, (adapter, bench)
            assert value["cached"] is False
    assert set(results["average"]) == set(results["scores"])
    table = (tmp_path / "a" / "results.md").read_text()
    assert table.splitlines()[0].startswith("| adapter | arc_challenge (acc)") and "| avg |" in table.splitlines()[0]
    assert all(f"| {a} |" in table for a in results["scores"]) and table.splitlines()[0] in printed
    assert (tmp_path / "a" / "results.png").read_bytes()[:8] == PNG_MAGIC
    predictions = [json.loads(line) for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    # 10 benchmarks x 2 items x (1 + 2 + 2 + 1) units, and the run's sni_unseen: 2 items x 4 units
    assert len(predictions) == 10 * 2 * 6 + 2 * 4
    assert {p["id"].rsplit("-", 1)[0] for p in predictions if p["benchmark"] == "sni_unseen"} <= {"toy_4", "toy_5"}

    # The PEFT copy of the first T2L adapter, scored in the same mixed batches, matches T2L's unit.
    def rows(adapter, slot=0):
        return [p for p in predictions if p["adapter"] == adapter and p["description_slot"] == slot
                and p["benchmark"] == "arc_easy"]
    for t2l, same in zip(rows("t2l"), rows("same")):
        assert t2l["id"] == same["id"] and t2l["prediction"]["logprobs"] == pytest.approx(
            same["prediction"]["logprobs"], abs=1e-3)
    # ... and differs from the base model: the adapter is really applied
    assert any(abs(a - b) > 1e-4 for t, b_ in zip(rows("t2l"), rows("base"))
               for a, b in zip(t["prediction"]["logprobs"], b_["prediction"]["logprobs"]))

    # Same arguments again: every unit comes from the cache, and the numbers are the same.
    assert _eval(world, tmp_path / "b", "--benchmarks", "all", "--adapters", adapters, "--protocol", "chat") == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] == 10 * 6 + 4
    assert all(v["cached"] for per in again["scores"].values() for v in per.values())
    assert {a: {b: v["score"] for b, v in per.items()} for a, per in again["scores"].items()} == \
        {a: {b: v["score"] for b, v in per.items()} for a, per in results["scores"].items()}
    # Another setting misses: generation scoring of multiple choice is a different result.
    assert _eval(world, tmp_path / "c", "--benchmarks", "piqa", "--adapters", "base", "--scoring", "generate",
                 "--protocol", "chat") == 0
    third = json.loads((tmp_path / "c" / "results.json").read_text())
    assert third["cache"] == {"hits": 0, "misses": 1, "folder": str(world["root"] / "cache")}


def test_eval_errors_are_one_line(world, tmp_path, capsys):
    assert _eval(world, tmp_path, "--benchmarks", "arc_easyy") == 1
    err = capsys.readouterr().err
    assert "unknown benchmark 'arc_easyy'" in err and "did you mean 'arc_easy'" in err and "Traceback" not in err
    assert main(["eval", str(world["recipe"]), "--dtype", "float32", "--adapters", "t2l", "--limit", "1"]) == 1
    assert "needs a trained run folder" in capsys.readouterr().err


def test_eval_of_a_recipe_scores_the_base_model_and_peft_folders(world, tmp_path):
    out = tmp_path / "r"
    assert main(["eval", str(world["recipe"]), "--dtype", "float32", "--benchmarks", "winogrande,boolq", "--limit", "2", "--no-cache",
                 "--adapters", f"base,base+description,{world['same_as_t2l']}", "-o", str(out), "--protocol", "chat"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["scores"]) == ["base", "base+description", "same_as_t2l"]
    assert results["adapters"]["same_as_t2l"]["kind"] == "peft" and results["cache"]["folder"] is None


def _predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_lm_eval_protocol_scores_cloze_continuations_with_acc_norm_and_paired_differences(world, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2l_framework.eval.loglik import encode_pair
    from t2l_framework.eval.stats import paired_difference

    out = tmp_path / "lm"
    assert _eval(world, out, "--benchmarks", "arc_easy,winogrande,boolq", "--adapters", "base,t2l",
                 "--protocol", "lm-eval", "--limit", "3", "--dtype", "float32") == 0
    results = json.loads((out / "results.json").read_text())
    assert {b: (v["protocol"], v["scoring"], v["metrics"]) for b, v in results["benchmarks"].items()} == {
        "arc_easy": ("lm-eval", "cloze", ["acc_norm"]), "winogrande": ("lm-eval", "cloze", []),
        "boolq": ("lm-eval", "cloze", [])}
    preds = _predictions(out)
    # base rows: each option's log-likelihood is log p(" " + choice | raw context), as the harness computes it
    model = AutoModelForCausalLM.from_pretrained(world["llm"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(world["llm"])
    (wg,) = get_benchmarks(["winogrande"])
    for ex in wg.examples(3, "lm-eval"):
        row = next(p for p in preds if p["adapter"] == "base" and p["id"] == ex.id)
        for (context, continuation), got in zip(ex.cloze, row["prediction"]["logprobs"]):
            ctx, cont = encode_pair(tok, context, continuation)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
            want = float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
            assert got == pytest.approx(want, abs=1e-3)
    # acc_norm per item is the argmax of log-likelihood per character of the choice
    (arc,) = get_benchmarks(["arc_easy"])
    for ex in arc.examples(3, "lm-eval"):
        row = next(p for p in preds if p["adapter"] == "t2l" and p["id"] == ex.id and p["description_slot"] == 0)
        lp = row["prediction"]["logprobs"]
        best = max(range(len(lp)), key=lambda i: (lp[i] / ex.norm_lengths[i], -i))
        assert row["prediction"]["choice_norm"] == best and row["acc_norm"] == float(best == ex.gold)
    # the paired difference against base is over the same items, descriptions averaged first
    for bench in results["benchmarks"]:
        base = [p["score"] for p in preds if p["adapter"] == "base" and p["benchmark"] == bench]
        t2l = [sum(p["score"] for p in preds if p["adapter"] == "t2l" and p["benchmark"] == bench and p["id"] == i) / 2
               for i in [p["id"] for p in preds if p["adapter"] == "base" and p["benchmark"] == bench]]
        diff, se = paired_difference(t2l, base)
        assert results["scores"]["t2l"][bench]["vs_base"] == pytest.approx({"diff": diff, "se": se})
    table = (out / "results.md").read_text()
    assert "| arc_easy (acc_norm) |" in table.splitlines()[0] and "Paired difference against `base`" in table
    assert "| t2l − base |" in table
    # the protocol is part of the cache key: chat scoring of the same items is computed afresh
    assert _eval(world, tmp_path / "chat", "--benchmarks", "winogrande", "--adapters", "base", "--limit", "3",
                 "--dtype", "float32", "--protocol", "chat") == 0
    assert json.loads((tmp_path / "chat" / "results.json").read_text())["cache"]["misses"] == 1


def test_paper_protocol_generates_and_grades_by_the_reference_rules(world, tmp_path):
    from t2l_framework.eval.scoring import reference_bool_correct, reference_choice_correct

    out = tmp_path / "paper"
    assert _eval(world, out, "--benchmarks", "piqa,boolq", "--adapters", "base,t2l", "--limit", "3") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["protocol"] == "paper"  # the default
    assert {b: v["scoring"] for b, v in results["benchmarks"].items()} == {"piqa": "generate", "boolq": "generate"}
    targets = {(b.name, e.id): e.target for b in get_benchmarks(["piqa", "boolq"]) for e in b.examples(3, "paper")}
    for p in _predictions(out):
        rule = reference_bool_correct if p["benchmark"] == "boolq" else reference_choice_correct
        assert isinstance(p["prediction"], str)
        assert p["score"] == float(rule(p["prediction"], targets[p["benchmark"], p["id"]]))


def test_sni_differences_are_clustered_by_task_and_avg_uses_shared_benchmarks(world, tmp_path):
    from t2l_framework.eval.report import averages, markdown_table
    from t2l_framework.eval.stats import paired_difference

    out = tmp_path / "sni"
    assert _eval(world, out, "--benchmarks", "sni_unseen", "--adapters", "base,t2l", "--limit", "8") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"]["sni_unseen"]["se_clustered_by_task"] is True
    preds = _predictions(out)
    ids = [p["id"] for p in preds if p["adapter"] == "base"]
    base = [p["score"] for p in preds if p["adapter"] == "base"]
    # a run's sni_unseen: its own never-trained tasks, each item asked with its own description
    t2l = [p["score"] for i in ids for p in preds if p["adapter"] == "t2l" and p["id"] == i]
    tasks = [i.rsplit("-", 1)[0] for i in ids]
    assert set(tasks) == {"toy_4", "toy_5"} and len(t2l) == len(ids) == 8
    diff, se = paired_difference(t2l, base, clusters=tasks)
    assert results["scores"]["t2l"]["sni_unseen"]["vs_base"] == pytest.approx({"diff": diff, "se": se})
    # avg: over the benchmarks every adapter has (an adapter missing one is not averaged over it)
    results["benchmarks"]["extra"] = {"metric": "acc", "n": 1}
    results["scores"]["base"]["extra"] = {"score": 1.0, "se": 0.0}
    assert averages(results)["base"] == pytest.approx(results["scores"]["base"]["sni_unseen"]["score"])
    assert "avg: over the 1 benchmarks every adapter has" in markdown_table(results)
    # a recipe (no run) scores the bundle's held-out SNI tasks
    assert main(["eval", str(world["recipe"]), "--dtype", "float32", "--benchmarks", "sni_unseen", "--adapters",
                 "base", "--limit", "8", "--max-new-tokens", "2", "--no-cache", "-o", str(tmp_path / "bundle")]) == 0
    bundle = {p["id"].rsplit("-", 1)[0] for p in _predictions(tmp_path / "bundle")}
    assert len(bundle) == 4 and not bundle & {"toy_4", "toy_5"}


def test_recipe_protocol_key_and_bad_values(world, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(world["recipe"].read_text().replace("eval:\n", "eval:\n  protocol: lm-eval\n"))
    out = tmp_path / "o"
    assert main(["eval", str(recipe), "--dtype", "float32", "--benchmarks", "piqa", "--adapters", "base", "--limit", "1", "--no-cache",
                 "-o", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["benchmarks"]["piqa"]["protocol"] == "lm-eval"
    recipe.write_text(world["recipe"].read_text().replace("eval:\n", "eval:\n  protocol: harness\n"))
    assert main(["eval", str(recipe), "--dtype", "float32", "--benchmarks", "piqa", "--adapters", "base", "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert "eval.protocol" in err and "harness" in err and "Traceback" not in err


def test_description_controls_are_adapter_conditions_of_any_run(world, tmp_path):
    """(d), (f), (g) from the evaluated run's hypernetwork, paired with base on the same items;
    the generic description is one adapter for every task, so it is scored once."""
    out = tmp_path / "controls"
    adapters = "base,t2l,other_description,random_description,generic_description"
    assert _eval(world, out, "--benchmarks", "sni_unseen", "--adapters", adapters, "--limit", "8") == 0
    results = json.loads((out / "results.json").read_text())
    scores = {name: per_bench["sni_unseen"] for name, per_bench in results["scores"].items()}
    assert list(scores) == adapters.split(",")
    # the run's sni_unseen: each item has its own description, so one slot each (several slots:
    # tests/test_description_controls.py on the bundle's sni_unseen)
    assert [len(scores[n]["per_description"]) for n in scores] == [1, 1, 1, 1, 1]
    assert all("vs_base" in scores[n] for n in scores if n != "base")
    assert results["adapters"]["random_description"]["identity"] == results["adapters"]["t2l"]["identity"]
