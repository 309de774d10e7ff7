"""Step budgets end to end (cut short by max_time -> exit 3 and marked rows; steps and time in
the report) and the shipped demo's shape (unseen set size, equal work for T2L and MT-LoRA)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from t2l_framework.cli import main
from t2l_framework.config import load_recipe, recipes_dir, resolve_path
from t2l_framework.data.tasks import expand_task_ids, load_tasks
from t2l_framework.run_folder import RunFolder
from t2l_framework.training.budget import EXIT_CUT_SHORT, exit_status
from t2l_framework.training.training_status import TrainingStatus
from tests.tiny_world import build_world

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("budget_world"))


def _rows(report: str) -> dict[str, str]:
    """Condition label -> its whole table row, from the first (seen) table of report.md."""
    rows = {}
    for line in report.splitlines():
        m = re.match(r"\| (\([a-g]\)[^|]*?) \| \d+ \|", line)
        if m and m.group(1) not in rows:
            rows[m.group(1)] = line
    return rows


def _fit(world, name: str, *overrides: str) -> int:
    return main(["fit", str(world["recipe"]), f"training.run_name={name}", "eval.final_report=true", *overrides])


# A step budget no tiny run reaches in one second: max_time must stop it.
ENDLESS = ("trainer.max_steps=100000", "trainer.max_time=00:00:00:01", "trainer.val_check_interval=100000",
           "training.checkpoint_every_n_steps=100000")


def test_max_time_cut_short_exits_3_and_marks_every_trained_row(world, capsys):
    runs = world["root"] / "runs"
    assert _fit(world, "mt_cut", "training.mode=lora", *ENDLESS) == EXIT_CUT_SHORT
    assert _fit(world, "t2l_cut", *ENDLESS, f"eval.baseline_adapter={runs / 'mt_cut' / 'adapter'}") == EXIT_CUT_SHORT
    err = capsys.readouterr().err
    own, base = TrainingStatus.load(runs / "t2l_cut"), TrainingStatus.load(runs / "mt_cut")
    for status in (own, base):
        assert status.cut_short and status.stopped_by == "max_time" and 0 < status.steps < 100000
        assert status.examples == status.steps * 4 * 2  # 4 tasks x 2 samples per step
    assert f"TRAINING CUT SHORT at step {own.steps} of 100000" in err
    assert "error: training was cut short by trainer.max_time" in err
    report = (runs / "t2l_cut" / "report.md").read_text()
    rows = _rows(report)
    mark = f"cut short at step {own.steps} of 100000 by max_time 00:00:00:01"
    assert mark in rows["(c) T2L, held-out description"] and mark in rows["(d) T2L, another task's description"]
    assert f"cut short at step {base.steps} of 100000" in rows["(e) multi-task LoRA"]
    assert rows["(a) base model"].endswith("| - |")  # untrained conditions carry no training
    assert report.startswith("**Warning: cut short by trainer.max_time")
    saved = json.loads((runs / "t2l_cut" / "report.json").read_text())
    assert saved["training"]["mt_lora"].startswith(f"cut short at step {base.steps} of 100000")


def test_allow_cut_short_exits_0_but_still_marks_the_report(world):
    runs = world["root"] / "runs"
    assert _fit(world, "t2l_allowed", *ENDLESS, "training.allow_cut_short=true") == 0
    status = TrainingStatus.load(runs / "t2l_allowed")
    assert status.cut_short and status.allow_cut_short and exit_status(runs / "t2l_allowed") == 0
    assert f"cut short at step {status.steps} of 100000" in (runs / "t2l_allowed" / "report.md").read_text()


def test_full_runs_report_steps_examples_and_time_and_flag_unequal_work(world, capsys):
    runs = world["root"] / "runs"
    assert _fit(world, "mt_3", "training.mode=lora", "trainer.max_steps=3") == 0
    capsys.readouterr()
    assert _fit(world, "t2l_4", "trainer.max_steps=4", f"eval.baseline_adapter={runs / 'mt_3' / 'adapter'}",
                "eval.report_seen_per_task=2") == 0
    # the time breakdown: printed at the end and kept in report.json
    printed = capsys.readouterr()
    breakdown = (printed.out + printed.err)[(printed.out + printed.err).rindex("time: "):]
    parts = json.loads((runs / "t2l_4" / "report.json").read_text())["seconds"]
    tables = [k for k in parts if k.startswith("table: ")]
    assert len(embed := [k for k in parts if k.startswith("embed ")]) == 1
    assert [k.split(" (")[0] for k in tables] == ["table: Training tasks, held-out instances and descriptions",
                                                  "table: Tasks never seen in training"]
    embed = [k for k in parts if k.startswith("embed ") and k.endswith(" descriptions (encoder load + cache)")]
    for part in ["load base model", "train (4 steps)", *embed, *tables]:
        assert parts[part] >= 0 and part in breakdown, part
    assert "other (setup, checks, writing files)" in breakdown
    own = json.loads(RunFolder(runs / "t2l_4").status.read_text())
    assert (own["steps"], own["max_steps"], own["examples"], own["stopped_by"]) == (4, 4, 32, "")
    assert own["seconds"] > 0
    rows = _rows((runs / "t2l_4" / "report.md").read_text())
    assert re.search(r"\| 4 of 4 steps \(32 examples\), \d+ (min \d+ )?s \|$", rows["(c) T2L, held-out description"])
    assert "3 of 3 steps (24 examples)" in rows["(e) multi-task LoRA"]
    for control in ("(f) T2L, random letters of the description's length",
                    "(g) T2L, one generic description ('Answer the question.')"):
        assert re.search(r"\| 4 of 4 steps \(32 examples\), \d+ (min \d+ )?s \|$", rows[control])
    assert "not the same work as T2L (4 steps, 32 examples)" in rows["(e) multi-task LoRA"]
    report = (runs / "t2l_4" / "report.md").read_text()
    assert "cut short" not in report
    # eval.report_seen_per_task=2 trims the in-distribution table to 2 items x 4 tasks; the
    # unseen one keeps data.max_eval_instances (4) x 2 tasks.
    assert rows["(a) base model"].startswith("| (a) base model | 8 |")
    assert "**Training tasks, held-out instances and descriptions** (4 tasks)" in report
    saved = json.loads((runs / "t2l_4" / "report.json").read_text())["tables"]
    assert [len(t["items"]) for t in saved.values()] == [8, 8]
    seen_tasks = [it["task"] for it in saved["Training tasks, held-out instances and descriptions"]["items"]]
    assert sorted(seen_tasks) == sorted(["toy_0", "toy_1", "toy_2", "toy_3"] * 2)


def test_tables_use_task_clustered_standard_errors(world):
    """The SE printed for (c) is the CR1 task-clustered one, recomputed here from the items."""
    from t2l_framework.eval.sni_report import rescore
    from t2l_framework.eval.stats import clustered_mean_se, mean_se

    runs = world["root"] / "runs"
    if not (runs / "t2l_4" / "report.json").is_file():
        assert _fit(world, "t2l_4", "trainer.max_steps=4") == 0
    tables, training = rescore(runs / "t2l_4" / "report.json")
    res = tables["Training tasks, held-out instances and descriptions"]["t2l"]
    clustered = clustered_mean_se(res["em_items"], res["tasks"])
    assert (res["em"], res["em_se"]) == pytest.approx(clustered, nan_ok=True)
    assert training["t2l"].startswith("4 of 4 steps")


# --- the shipped demo ----------------------------------------------------------------------

DEMO, MTLORA = recipes_dir() / "smollm2_demo.yaml", recipes_dir() / "smollm2_demo_mtlora.yaml"


def _demo_cfg(path: Path):
    return load_recipe(str(path))


def test_demo_unseen_set_has_20_tasks_300_items_none_trained():
    cfg = _demo_cfg(DEMO)
    train = expand_task_ids(cfg.data.train_tasks, DEMO)
    unseen = expand_task_ids(cfg.data.eval_tasks, DEMO)
    assert len(unseen) >= 20 and not set(unseen) & set(train)
    tasks = load_tasks(resolve_path(cfg.data.tasks_file, DEMO), resolve_path(cfg.data.instances_file, DEMO),
                       include=unseen)
    cap = int(cfg.data.max_eval_instances)
    items = sum(min(cap, len(tasks[t].test)) if cap else len(tasks[t].test) for t in unseen)
    limit = int(cfg.eval.report_max_items)
    assert (min(items, limit) if limit else items) >= 300
    for tid in unseen:  # short answers, as data/demo_tasks.yaml states the rule
        words = [len(inst.outputs[0].split()) for inst in tasks[tid].test]
        assert statistics.median(words) <= 3 and sum(w <= 5 for w in words) >= 0.8 * len(words), tid


def test_demo_tasks_file_lists_the_recipes_tasks():
    listed = yaml.safe_load((ROOT / "data" / "demo_tasks.yaml").read_text())
    for path in (DEMO, MTLORA):
        cfg = _demo_cfg(path)
        assert list(cfg.data.train_tasks) == listed["train_tasks"]
        assert list(cfg.data.eval_tasks) == listed["eval_tasks"]


LONG, LONG_MTLORA = recipes_dir() / "smollm2_demo_long.yaml", recipes_dir() / "smollm2_demo_long_mtlora.yaml"


@pytest.mark.parametrize("t2l_recipe, mt_recipe", [(DEMO, MTLORA), (LONG, LONG_MTLORA)], ids=["demo", "demo-long"])
def test_demo_baseline_does_the_same_work_as_t2l(t2l_recipe, mt_recipe):
    """Same tasks, batch, steps, seed and schedule: (e) against (c) is a comparison by work."""
    t2l, mt = _demo_cfg(t2l_recipe), _demo_cfg(mt_recipe)
    assert Path(t2l.eval.baseline_adapter).parent.name == mt_recipe.stem  # (e) is this pair's own baseline
    assert (t2l.training.mode, mt.training.mode) == ("sft", "lora")
    assert t2l.data == mt.data and t2l.trainer == mt.trainer and t2l.lora == mt.lora
    same = ("lr", "weight_decay", "warmup_steps", "warmup_ratio", "scheduler", "label_smoothing", "seed")
    assert all(t2l.training[k] == mt.training[k] for k in same)
    assert t2l.trainer.max_time and not t2l.training.allow_cut_short  # a safety net that fails loudly


def _fake_t2l(tmp_path: Path, body: str) -> tuple[Path, Path]:
    """A stand-in ``t2l`` that logs its arguments to the returned log file, then runs ``body``."""
    log, fake = tmp_path / "calls", tmp_path / "bin" / "t2l"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{body}\n')
    fake.chmod(0o755)
    return log, fake


def _make_demo_runs(fake: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), "demo-runs", f"BIN={fake.parent}", *args],
                          capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})


@pytest.mark.skipif(not Path("/usr/bin/make").exists(), reason="make is not installed")
def test_make_demo_fails_when_a_run_was_cut_short_but_still_runs_t2l(tmp_path):
    """`make demo-runs` with a stand-in t2l: the baseline run is cut short (exit 3)."""
    log, fake = _fake_t2l(tmp_path, f'case "$2" in *mtlora) exit {EXIT_CUT_SHORT};; esac\nexit 0')
    run = _make_demo_runs(fake)
    assert run.returncode != 0, run.stdout + run.stderr
    assert log.read_text().splitlines() == ["fit smollm2_demo_mtlora --overwrite", "fit smollm2_demo --overwrite"]
    assert "cut short" in run.stderr
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 2\n")  # a real error stops at once
    log.unlink()
    run = _make_demo_runs(fake)
    assert run.returncode != 0 and log.read_text().splitlines() == ["fit smollm2_demo_mtlora --overwrite"]


@pytest.mark.skipif(not Path("/usr/bin/make").exists(), reason="make is not installed")
def test_make_demo_passes_the_same_overrides_to_both_runs(tmp_path):
    log, fake = _fake_t2l(tmp_path, "exit 0")
    run = _make_demo_runs(fake, "DEMO_ARGS=trainer.max_steps=7 training.seed=7")
    assert run.returncode == 0, run.stdout + run.stderr
    assert log.read_text().splitlines() == [
        "fit smollm2_demo_mtlora trainer.max_steps=7 training.seed=7 --overwrite",
        "fit smollm2_demo trainer.max_steps=7 training.seed=7 --overwrite"]


@pytest.mark.skipif(not Path("/usr/bin/make").exists(), reason="make is not installed")
def test_make_demo_long_trains_the_long_pair(tmp_path):
    """`make demo-long` is demo-runs on the long recipe pair (the stand-in t2l logs the calls), and that pair
    is the scaling map's best cell: every eligible training task (the task-set rule's 'all'), 864 steps,
    10% warm-up, otherwise the 96-step demo's settings."""
    from t2l_framework.data.demo_task_sets import training_task_set

    log, fake = _fake_t2l(tmp_path, "exit 0")
    run = _make_demo_runs(fake, "DEMO_T2L=smollm2_demo_long")
    assert run.returncode == 0, run.stdout + run.stderr
    assert log.read_text().splitlines() == ["fit smollm2_demo_long_mtlora --overwrite", "fit smollm2_demo_long --overwrite"]
    long, demo = _demo_cfg(LONG), _demo_cfg(DEMO)
    assert list(long.data.train_tasks) == training_task_set("all") and len(long.data.train_tasks) == 76
    assert long.trainer.max_steps == 864 and long.training.warmup_ratio == 0.1
    assert list(long.data.eval_tasks) == list(demo.data.eval_tasks)
    for section in ("hypernet", "lora", "encoder", "base_model"):
        assert long[section] == demo[section], section
    same_training = ("lr", "weight_decay", "scheduler", "label_smoothing", "l2_penalty", "neftune_alpha", "seed")
    assert all(long.training[k] == demo.training[k] for k in same_training)
    makefile = (ROOT / "Makefile").read_text()
    assert "demo-runs DEMO_T2L=smollm2_demo_long" in makefile.split("\ndemo-long:", 1)[1].split("\n\n")[0]
