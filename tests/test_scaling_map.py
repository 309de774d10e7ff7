"""benchmarks/scaling_map.py's bookkeeping: cell folders keep seeds and levers apart, and the table
is rebuilt from every finished cell, also those of an earlier call with another grid."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scaling_map():
    spec = importlib.util.spec_from_file_location("scaling_map", ROOT / "benchmarks" / "scaling_map.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(tasks, steps, seed, overrides, c_em):
    row = {"c_em": c_em, "c_em_se": 0.01, "items": 10,
           "(c)-(d)": {"em": 0.02, "em_se": 0.01, "cse": 2.0}, "(c)-(e)": {"em": -0.01, "em_se": 0.01, "cse": -1.0}}
    return {"tasks": tasks, "task_set": tasks, "steps": steps, "seed": seed, "overrides": overrides,
            "cpu": "test CPU", "wall_s": 60.0, "training": {}, "unseen": row, "seen": row}


def test_cell_names_separate_seeds_and_overrides():
    m = _scaling_map()
    names = {m.cell_name(30, 96, 42, []), m.cell_name(30, 96, 7, []),
             m.cell_name(30, 96, 42, ["training.lr_head_bias=10"]), m.cell_name(30, 96, 42, ["training.lr=3e-3"])}
    assert len(names) == 4
    assert m.cell_name(30, 96, 42, ["training.lr=3e-3"]) == m.cell_name(30, 96, 42, ["training.lr=3e-3"])


def test_table_and_plot_come_from_every_finished_cell(tmp_path):
    m = _scaling_map()
    cells = [_cell(30, 96, 42, [], 0.111), _cell(10, 96, 42, [], 0.222), _cell(30, 96, 42, ["training.lr=3e-3"], 0.333)]
    cells[0]["spread"] = {"training tasks": 0.0896, "random letters": 0.0114}
    for c in cells:
        folder = tmp_path / "cells" / m.cell_name(c["tasks"], c["steps"], c["seed"], c["overrides"])
        folder.mkdir(parents=True)
        (folder / "cell.json").write_text(json.dumps(c))
    (tmp_path / "cells" / "unfinished").mkdir()  # no cell.json: not in the table
    found = m.finished_cells(tmp_path)
    assert [(r["tasks"], r["overrides"]) for r in found] == [(10, []), (30, []), (30, ["training.lr=3e-3"])]
    md = m.write_table(found, tmp_path)
    rows = [line for line in md.splitlines() if line.startswith("| 10 ") or line.startswith("| 30 ")]
    assert len(rows) == 3 and "0.222" in rows[0] and "training.lr=3e-3" in rows[2] and "+2.0" in rows[1]
    assert "| 0.090 / 0.011 |" in rows[1] and "| - |" in rows[0]  # a cell without its T2L run on disk: no spread
    m.plot(found, tmp_path)
    assert (tmp_path / "scaling_map.png").stat().st_size > 1000


def test_likelihood_contrasts_are_read_from_the_report_and_back_filled_from_the_runs(tmp_path):
    """A cell records the answer-likelihood contrasts its report holds; a cell whose report predates
    them gets them from its runs on disk, the same numbers the end-of-training table gives."""
    from t2l_framework.assembly import fit
    from tests.tiny_world import build_world

    m = _scaling_map()
    world = build_world(tmp_path / "world")
    run = fit(str(world["recipe"]), ["trainer.max_steps=4", "training.run_name=cellrun", "eval.final_report=true"])
    numbers = m.cell_numbers(run / "report.json")
    d = numbers["unseen"]["(c)-(d)"]
    assert d["ll_cse"] == d["ll"] / d["ll_se"] and d["ll"] != 0
    # the same run as a map cell whose report was written before the tables scored the likelihood
    cell = tmp_path / "map" / "cells" / "2_tasks-4_steps-seed42"
    cell.mkdir(parents=True)
    (cell / "t2l").symlink_to(run, target_is_directory=True)
    report = json.loads((run / "report.json").read_text())
    old = json.loads(json.dumps(report))
    for table in old["tables"].values():
        for it in table["items"]:
            for key in [k for k in it if k.endswith(":answer_logprob")]:
                del it[key]
    (run / "report.json").write_text(json.dumps(old))
    stale = {"tasks": 2, "task_set": 2, "steps": 4, "seed": 42, "overrides": [], "cpu": "test CPU", "wall_s": 1.0,
             "spread": {}, **{k: v for k, v in m.cell_numbers(run / "report.json").items()}}
    assert "ll" not in stale["unseen"]["(c)-(d)"]
    (cell / "cell.json").write_text(json.dumps(stale))
    [found] = m.finished_cells(tmp_path / "map")
    assert found["unseen"]["(c)-(d)"]["ll"] == __import__("pytest").approx(d["ll"], abs=1e-6)
    back = json.loads((run / "report.json").read_text())
    for title, table in report["tables"].items():
        for it, again in zip(table["items"], back["tables"][title]["items"]):
            assert again["t2l:answer_logprob"] == __import__("pytest").approx(it["t2l:answer_logprob"], abs=1e-6)
    assert json.loads((cell / "cell.json").read_text())["unseen"]["(c)-(d)"]["ll_cse"] is not None
    assert "unseen answer log-lik cSE" in m.write_table([found], tmp_path / "map")
