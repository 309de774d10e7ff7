"""A run whose training loss blows up is marked DIVERGED in its status and every report row, and
`t2l fit` exits 4 (the 288-step demo on seed 7 once went from loss 5.2 to 41 without a word)."""

import math
import os
import subprocess
from pathlib import Path

import pytest

from t2l_framework.cli import main
from t2l_framework.eval.sni_report import render, score
from t2l_framework.training.budget import EXIT_CUT_SHORT, exit_status
from t2l_framework.training.divergence import EXIT_DIVERGED, WINDOW, LossTracker, diverged
from t2l_framework.training.training_status import TrainingStatus
from tests.tiny_world import build_world

ROOT = Path(__file__).resolve().parent.parent


def test_tracker_keeps_the_first_loss_and_means_the_last_window():
    t = LossTracker()
    for _ in range(WINDOW):
        t.add(5.0)
    assert t.losses() == (5.0, None)  # the end window would include the first batch: not measured yet
    t.add(5.0)
    assert t.losses() == (5.0, 5.0)
    for _ in range(WINDOW):
        t.add(20.0)
    assert t.losses() == (5.0, 20.0) and diverged(*t.losses())
    short = LossTracker()
    assert short.losses() == (None, None) and not diverged(*short.losses())


def test_a_non_finite_loss_diverges_and_a_resume_keeps_its_start():
    t = LossTracker()
    t.add(float("nan"))
    start, end = t.losses()
    assert start is None and math.isnan(end) and diverged(start, end)  # NaN from the first batch on
    resumed = LossTracker(start=6.0)
    for _ in range(WINDOW):
        resumed.add(3.0)
    assert resumed.losses() == (6.0, 3.0) and not diverged(6.0, 3.0)
    assert not diverged(6.0, 11.9) and diverged(6.0, 12.1)  # RATIO 2


def test_status_marks_reports_and_sets_the_exit_status(tmp_path):
    done = dict(mode="sft", steps=10, max_steps=10, examples=80, seconds=12.0)
    bad = TrainingStatus(**done, loss_start=5.2, loss_end=40.9)
    assert bad.describe().startswith("DIVERGED (training loss 5.20 -> 40.90): 10 of 10 steps")
    bad.save(tmp_path)
    assert TrainingStatus.load(tmp_path) == bad and exit_status(tmp_path) == EXIT_DIVERGED
    TrainingStatus(**done, loss_start=5.2, loss_end=float("nan")).save(tmp_path)
    assert TrainingStatus.load(tmp_path).diverged  # NaN survives the JSON round trip
    TrainingStatus(**done, loss_start=5.2, loss_end=2.1).save(tmp_path)
    assert exit_status(tmp_path) == 0 and not TrainingStatus.load(tmp_path).describe().startswith("DIVERGED")
    TrainingStatus(**{**done, "steps": 5}, loss_start=5.2, loss_end=2.1).save(tmp_path)
    assert exit_status(tmp_path) == EXIT_CUT_SHORT
    items = [{"task": "a", "answers": ["yes"]}, {"task": "b", "answers": ["no"]}]
    md = render({"T": {"t2l": score(["x", "y"], items), "base": score(["yes", "no"], items)}},
                {"t2l": bad.describe()})
    assert "**Warning: training diverged" in md and "(c) T2L, held-out description" in md.splitlines()[0]
    assert "| **DIVERGED (training loss 5.20 -> 40.90)" in md


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("divergence_world"))


def test_fit_whose_loss_runs_away_exits_4_and_says_so(world, capsys, monkeypatch):
    # The loss runs away by construction: the training loss the run sees grows with the step.
    # (A runaway learning rate is not a test: the tiny model's loss is bounded near log(vocab),
    # and whether lr 9 pushed it past 2x the start depended on the CPU's float32 kernels: it did
    # on an Intel Xeon, and ended at 4.93 from 4.54 on an AMD EPYC.)
    from t2l_framework.training.module import T2LModule

    real_step = T2LModule._step

    def runaway_step(self, batch, train):
        loss, logs = real_step(self, batch, train)
        return (loss * (1 + self.global_step) if train else loss), logs

    monkeypatch.setattr(T2LModule, "_step", runaway_step)
    code = main(["fit", str(world["recipe"]), "training.run_name=runaway", "trainer.max_steps=24",
                 "eval.final_report=false"])
    status = TrainingStatus.load(world["root"] / "runs" / "runaway")
    assert status.diverged, status
    assert code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "TRAINING DIVERGED" in err and "error: training diverged" in err


def test_fit_that_learns_is_not_called_diverged(world):
    assert main(["fit", str(world["recipe"]), "training.run_name=learns", "trainer.max_steps=24",
                 "eval.final_report=false"]) == 0
    status = TrainingStatus.load(world["root"] / "runs" / "learns")
    assert status.loss_start is not None and status.loss_end is not None and status.loss_end < status.loss_start


@pytest.mark.skipif(not Path("/usr/bin/make").exists(), reason="make is not installed")
def test_make_demo_runs_the_table_after_a_diverged_baseline_then_fails(tmp_path):
    log, fake = tmp_path / "calls.log", tmp_path / "t2l"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$2" in *mtlora) exit {EXIT_DIVERGED};; esac\nexit 0\n')
    fake.chmod(0o755)
    run = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "demo-runs", f"BIN={tmp_path}"],
                         capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})
    assert run.returncode != 0, run.stdout + run.stderr
    assert log.read_text().splitlines() == ["fit smollm2_demo_mtlora --overwrite", "fit smollm2_demo --overwrite"]
    assert "diverged" in run.stderr
