"""`t2l eval` end to end on a tiny trained run: every benchmark with --limit 2, mixed adapters,
the JSON / table / PNG outputs and the result cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2l_framework.cli import main
from t2l_framework.eval.benchmarks import get_benchmarks
from t2l_framework.eval.harness import pick_descriptions
from tests.tiny_world import build_trained_world

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = build_trained_world(tmp_path_factory.mktemp("eval_world"), "evalrun", steps=3)
    from t2l_framework.inference import load_run

    # A PEFT folder holding exactly the T2L adapter that arc_easy's first description makes:
    # evaluated as a separate adapter it must reproduce that T2L unit's numbers.
    (arc,) = get_benchmarks(["arc_easy"])
    first = pick_descriptions(arc.descriptions("arc_easy"), 2, 0, "arc_easy")[0]
    runtime = load_run(world["run"])
    world["same_as_t2l"] = runtime.export([first], [world["root"] / "same_as_t2l"])[0]
    return world


def _eval(world, out: Path, *extra: str) -> int:
    return main(["eval", str(world["run"]), "--limit", "2", "--n-descriptions", "2", "--max-new-tokens", "6",
                 "--code-timeout", "5", "-o", str(out), "--cache-dir", str(world["root"] / "cache"), *extra])


def test_eval_writes_json_table_plot_and_reuses_the_cache(world, tmp_path, capsys):
    adapters = f"base,base+description,t2l,same={world['same_as_t2l']}"
    assert _eval(world, tmp_path / "a", "--benchmarks", "all", "--adapters", adapters) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    names = [b.name for b in get_benchmarks(["all"])]
    assert list(results["benchmarks"]) == names and len(names) == 11
    assert list(results["scores"]) == ["base", "base+description", "t2l", "same"]
    for adapter, per_bench in results["scores"].items():
        assert set(per_bench) == set(names)
        for bench, value in per_bench.items():
            assert value["n"] == 2 and 0.0 <= value["score"] <= 1.0, (adapter, bench)
            assert len(value["per_description"]) == (2 if adapter in ("base+description", "t2l") else 1)
            assert value["cached"] is False
    assert set(results["average"]) == set(results["scores"])
    table = (tmp_path / "a" / "results.md").read_text()
    assert table.splitlines()[0].startswith("| adapter | arc_challenge (acc)") and "| avg |" in table.splitlines()[0]
    assert all(f"| {a} |" in table for a in results["scores"]) and table.splitlines()[0] in printed
    assert (tmp_path / "a" / "results.png").read_bytes()[:8] == PNG_MAGIC
    predictions = [json.loads(line) for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    # 11 benchmarks x 2 items x (1 + 2 + 2 + 1) units
    assert len(predictions) == 11 * 2 * 6

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
    assert _eval(world, tmp_path / "b", "--benchmarks", "all", "--adapters", adapters) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] == 11 * 6
    assert all(v["cached"] for per in again["scores"].values() for v in per.values())
    assert {a: {b: v["score"] for b, v in per.items()} for a, per in again["scores"].items()} == \
        {a: {b: v["score"] for b, v in per.items()} for a, per in results["scores"].items()}
    # Another setting misses: generation scoring of multiple choice is a different result.
    assert _eval(world, tmp_path / "c", "--benchmarks", "piqa", "--adapters", "base", "--scoring", "generate") == 0
    third = json.loads((tmp_path / "c" / "results.json").read_text())
    assert third["cache"] == {"hits": 0, "misses": 1, "folder": str(world["root"] / "cache")}


def test_eval_errors_are_one_line(world, tmp_path, capsys):
    assert _eval(world, tmp_path, "--benchmarks", "arc_easyy") == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'arc_easyy'" in err and "did you mean 'arc_easy'" in err and "Traceback" not in err
    assert main(["eval", str(world["recipe"]), "--adapters", "t2l", "--limit", "1"]) == 2
    assert "needs a trained run folder" in capsys.readouterr().err


def test_eval_of_a_recipe_scores_the_base_model_and_peft_folders(world, tmp_path):
    out = tmp_path / "r"
    assert main(["eval", str(world["recipe"]), "--benchmarks", "winogrande,boolq", "--limit", "2", "--no-cache",
                 "--adapters", f"base,base+description,{world['same_as_t2l']}", "-o", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["scores"]) == ["base", "base+description", "same_as_t2l"]
    assert results["adapters"]["same_as_t2l"]["kind"] == "peft" and results["cache"]["folder"] is None
