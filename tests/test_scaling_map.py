"""benchmarks/scaling_map.py's bookkeeping: cell folders keep seeds and levers apart, and the table
is rebuilt from every finished cell, also those of an earlier call with another grid."""

import json
from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def _scaling_map():
    return load_benchmark("scaling_map")


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


def _recorded_runs(tmp_path, seed=7, steps=864, mt_steps=None, warmup=0.1):
    """A T2L run and the multi-task LoRA run its recipe compares against, as `make demo-long` leaves them."""
    from omegaconf import OmegaConf

    from t2l_framework.data.demo_task_sets import training_task_set

    runs = tmp_path / "runs"
    mt, t2l = runs / "demo_long_mtlora", runs / "demo_long"
    for run, n in ((mt, mt_steps or steps), (t2l, steps)):
        (run / "adapter").mkdir(parents=True)
        cfg = {"data": {"train_tasks": training_task_set("all")}, "trainer": {"max_steps": n, "max_time": "01:30:00"},
               "training": {"seed": seed, "warmup_ratio": warmup, "checkpoint_every_n_steps": 288},
               "eval": {"baseline_adapter": str(mt / "adapter") if run == t2l else ""}}
        OmegaConf.save(OmegaConf.create(cfg), run / "recipe.yaml")
    (mt / "training_status.json").write_text(json.dumps({"seconds": 1300.0}))
    (t2l / "report.json").write_text(json.dumps({"tables": {}, "seconds": {"train (864 steps)": 1400.0, "table": 900.0}}))
    return t2l, mt


def _record_args(seed=7, sets=("training.warmup_ratio=0.1",)):
    import argparse

    return argparse.Namespace(seed=seed, set=list(sets))


def test_a_run_trained_outside_the_map_is_recorded_as_its_cell(tmp_path, monkeypatch):
    """`--record` links both runs into the cell named by the grid point and writes its cell.json from
    them, so the cell is in the table like one the map trained."""
    m = _scaling_map()
    monkeypatch.setattr(m, "cell_numbers", lambda report: {"training": {}, "unseen": {"c_em": 0.1, "c_em_se": 0.01}})
    monkeypatch.setattr(m, "adapter_spreads", lambda run: {})
    t2l, mt = _recorded_runs(tmp_path)
    out = tmp_path / "map"
    cell = m.record_cell("all", 864, t2l, _record_args(), out)
    folder = out / "cells" / m.cell_name("all", 864, 7, ["training.warmup_ratio=0.1"])
    assert (folder / "t2l").resolve() == t2l.resolve() and (folder / "mt_lora").resolve() == mt.resolve()
    assert cell["tasks"] == 76 and cell["seed"] == 7 and cell["overrides"] == ["training.warmup_ratio=0.1"]
    assert cell["mt_lora_s"] == 1300.0 and cell["t2l_s"] == 2300.0 and cell["wall_s"] == 3600.0
    assert cell["recorded_from"] == {"t2l": str(t2l.resolve()), "mt_lora": str(mt.resolve())}
    [found] = m.finished_cells(out)
    assert found["seed"] == 7 and "| 76 | 864 | 7 | training.warmup_ratio=0.1 |" in m.write_table([found], out)
    with __import__("pytest").raises(SystemExit, match="finished already"):
        m.record_cell("all", 864, t2l, _record_args(), out)


def test_a_run_that_is_not_the_cell_is_refused_naming_the_setting(tmp_path):
    """The seed, steps, task set and each --set value are checked on both runs: a run of another cell,
    or a T2L run compared against a multi-task LoRA of other work, is not recorded."""
    import pytest

    m = _scaling_map()
    t2l, _ = _recorded_runs(tmp_path / "a")
    with pytest.raises(SystemExit, match="training.seed=7.*needs 42"):
        m.record_cell("all", 864, t2l, _record_args(seed=42), tmp_path / "map")
    with pytest.raises(SystemExit, match="trainer.max_steps=864.*needs 288"):
        m.record_cell("all", 288, t2l, _record_args(), tmp_path / "map")
    with pytest.raises(SystemExit, match="data.train_tasks"):
        m.record_cell(30, 864, t2l, _record_args(), tmp_path / "map")
    with pytest.raises(SystemExit, match="training.warmup_ratio=0.1.*needs 0.2"):
        m.record_cell("all", 864, t2l, _record_args(sets=["training.warmup_ratio=0.2"]), tmp_path / "map")
    t2l, mt = _recorded_runs(tmp_path / "b", mt_steps=288)
    with pytest.raises(SystemExit, match="multi-task LoRA run .* trainer.max_steps=288"):
        m.record_cell("all", 864, t2l, _record_args(), tmp_path / "map")
    (t2l / "report.json").unlink()
    with pytest.raises(SystemExit, match="no report.json"):
        m.record_cell("all", 864, t2l, _record_args(), tmp_path / "map")
    assert not (tmp_path / "map" / "cells").exists() or not any((tmp_path / "map" / "cells").glob("*/cell.json"))


def test_map_cells_score_the_answer_likelihood_that_make_demo_leaves_off(tmp_path):
    """`make demo`'s recipe drops the likelihood column for its 30-minute float32 budget; a map cell,
    trained from that recipe, turns it back on and keeps every grid setting and --set lever."""
    import argparse

    from t2l_framework.config import load_recipe

    m = _scaling_map()
    args = argparse.Namespace(seed=7, max_time="", eval_instances=2, seen_per_task=0, set=["training.lr=3e-3"])
    overrides = m.cell_overrides(["lol_318", "lol_319"], 8, args, tmp_path / "cell")
    assert load_recipe("smollm2_demo").eval.answer_loglik is False
    cfg = load_recipe("smollm2_demo", overrides)
    assert cfg.eval.answer_loglik is True and list(cfg.data.train_tasks) == ["lol_318", "lol_319"]
    assert (cfg.trainer.max_steps, cfg.training.seed, cfg.training.lr, cfg.data.max_eval_instances) == (8, 7, 3e-3, 2)
    assert load_recipe("smollm2_demo_long").eval.answer_loglik is True


def test_t2l_only_levers_share_the_multi_task_lora_of_the_cell_without_them(tmp_path, monkeypatch):
    """Two `--set-t2l` levers of one grid point train the multi-task LoRA once, in the plain cell's folder,
    and compare against that same run; each lever's own T2L run gets its override, the MT LoRA never."""
    import argparse

    m = _scaling_map()
    calls = []

    def fake_fit(recipe, overrides, log):
        calls.append((recipe, overrides))
        out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("training.output_dir=")))
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("training.run_name="))
        run = out / name
        (run / "adapter").mkdir(parents=True)
        if name == "mt_lora":
            (run / "training_status.json").write_text(json.dumps({"mode": "lora", "seconds": 50.0}))
        else:
            (run / "report.json").write_text(json.dumps({"seconds": {"train": 20.0}}))
        return 0

    clock = iter(range(0, 1000, 10))  # each run takes 10 s of wall time
    monkeypatch.setattr(m, "time", __import__("types").SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(m, "fit", fake_fit)
    monkeypatch.setattr(m, "cell_numbers", lambda report: {"training": {}, "unseen": {"c_em": 0.1, "c_em_se": 0.01}})
    monkeypatch.setattr(m, "adapter_spreads", lambda run: {})
    out = tmp_path / "map"
    base = dict(seed=42, max_time="", eval_instances=2, seen_per_task=0, set=["training.warmup_ratio=0.1"])
    rows = [m.run_cell(10, 8, argparse.Namespace(**base, set_t2l=[lever]), out)
            for lever in ("training.lr_head_bias=0.2", "hypernet.head=shared")]
    mt_runs = [o for r, o in calls if r == "smollm2_demo_mtlora"]
    assert len(mt_runs) == 1 and not any(o.startswith(("hypernet.", "training.lr_head_bias")) for o in mt_runs[0])
    plain = out / "cells" / m.cell_name(10, 8, 42, ["training.warmup_ratio=0.1"])
    t2l_runs = [o for r, o in calls if r == "smollm2_demo"]
    assert "training.lr_head_bias=0.2" in t2l_runs[0] and "hypernet.head=shared" in t2l_runs[1]
    assert all(f"eval.baseline_adapter={plain / 'mt_lora' / 'adapter'}" in o for o in t2l_runs)
    for row, lever in zip(rows, ("training.lr_head_bias=0.2", "hypernet.head=shared")):
        cell = out / "cells" / m.cell_name(10, 8, 42, ["training.warmup_ratio=0.1"], [lever])
        assert cell != plain and (cell / "mt_lora").resolve() == (plain / "mt_lora").resolve()
        assert row["t2l_overrides"] == [lever] and row["mt_lora_shared_from"] == plain.name
    assert rows[0]["mt_lora_s"] == 10.0 and rows[1]["mt_lora_s"] == 0.0  # trained by the first, shared by the second
    table = m.write_table(m.finished_cells(out), out)
    assert f"training.warmup_ratio=0.1 T2L: hypernet.head=shared ((e) shared with {plain.name})" in table


def test_set_t2l_refuses_what_the_multi_task_lora_would_read_and_record_checks_it_on_t2l_only(tmp_path, monkeypatch):
    import argparse

    import pytest

    m = _scaling_map()
    m.check_t2l_only(["hypernet.head=shared", "encoder.model=x", "training.lr_head_bias=0.2"])
    for bad in ("trainer.max_steps=10", "data.n_tasks_per_batch=4", "training.lr=1e-3", "hypernet"):
        with pytest.raises(SystemExit, match="--set-t2l"):
            m.check_t2l_only([bad])
    monkeypatch.setattr(m, "cell_numbers", lambda report: {"training": {}, "unseen": {"c_em": 0.1, "c_em_se": 0.01}})
    monkeypatch.setattr(m, "adapter_spreads", lambda run: {})
    t2l, mt = _recorded_runs(tmp_path)
    args = argparse.Namespace(seed=7, set=["training.warmup_ratio=0.1"], set_t2l=["training.lr_head_bias=0.2"])
    with pytest.raises(SystemExit, match=r"T2L run .* training.lr_head_bias=None.*needs 0.2"):
        m.record_cell("all", 864, t2l, args, tmp_path / "map")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(t2l / "recipe.yaml")
    cfg.training.lr_head_bias = 0.2
    OmegaConf.save(cfg, t2l / "recipe.yaml")
    cell = m.record_cell("all", 864, t2l, args, tmp_path / "map")  # the MT LoRA need not have it
    assert cell["t2l_overrides"] == ["training.lr_head_bias=0.2"] and cell["mt_lora_s"] == 0.0
    assert cell["mt_lora_shared_from"] == str(mt.resolve())
