"""`t2l fit --resume` on a damaged run folder: torn checkpoints are named, none readable is refused,
a segment that trained nothing writes no checkpoint, metrics.csv keeps earlier rows, and the
status file is written atomically."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from t2l_framework.assembly import fit
from t2l_framework.errors import T2LError
from t2l_framework.training.training_status import TrainingStatus
from t2l_framework.training.checkpoint_io import load_checkpoint_file
from tests.tiny_world import build_world

COMMON = ["trainer.max_steps=4", "training.checkpoint_every_n_steps=2", "trainer.val_check_interval=100",
          "base_model.dtype=float32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


class _StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True


class _FailAt(Callback):
    """Raises when the run reaches ``step`` (before training that step's batch)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


def _steps_logged(run: Path) -> list[int]:
    with open(run / "logs" / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/ce")]


def _stopped_run(world, name: str) -> Path:
    run = fit(str(world["recipe"]), COMMON + [f"training.run_name={name}"], callbacks=[_StopAt(2)])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step2.ckpt"]
    return run


def test_torn_last_checkpoint_is_named_and_resume_falls_back_and_keeps_the_metrics(world, capsys):
    run = _stopped_run(world, "torn-last")
    first = _steps_logged(run)
    assert first and max(first) < 2
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])  # a truncated copy, as a full disk leaves it
    capsys.readouterr()
    fit(str(world["recipe"]), COMMON + ["training.run_name=torn-last"], resume=True)
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {last}" in err
    assert f"resuming from {run / 'checkpoints' / 'step2.ckpt'}" in err
    steps = _steps_logged(run)
    assert steps[:len(first)] == first and max(steps) == 3  # the first segment's rows are still there
    assert load_checkpoint_file(last)["global_step"] == 4


def test_resume_with_every_checkpoint_torn_is_refused_and_touches_nothing(world):
    run = _stopped_run(world, "all-torn")
    ckpt_dir = run / "checkpoints"
    for p in ckpt_dir.iterdir():
        p.write_bytes(p.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    with pytest.raises(T2LError, match=r"no checkpoint in .* can be read \(last\.ckpt, step2\.ckpt\); .*--overwrite"):
        fit(str(world["recipe"]), COMMON + ["training.run_name=all-torn"], resume=True)
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before
    with pytest.raises(T2LError, match="can be read"):  # and again: nothing new to restart from
        fit(str(world["recipe"]), COMMON + ["training.run_name=all-torn"], resume=True)


def test_a_segment_that_trained_no_step_writes_no_checkpoint(world):
    with pytest.raises(RuntimeError, match="boom"):
        fit(str(world["recipe"]), COMMON + ["training.run_name=fails-at-0"], callbacks=[_FailAt(0)])
    ckpt_dir = world["root"] / "runs" / "fails-at-0" / "checkpoints"
    assert not ckpt_dir.exists() or not any(ckpt_dir.iterdir())
    # a resumed segment that fails before its first step leaves the folder as it was
    run = _stopped_run(world, "resume-fails")
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        fit(str(world["recipe"]), COMMON + ["training.run_name=resume-fails"], resume=True, callbacks=[_FailAt(2)])
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    # and one that trains a step before failing does write interrupted.ckpt
    with pytest.raises(RuntimeError, match="boom"):
        fit(str(world["recipe"]), COMMON + ["training.run_name=resume-fails"], resume=True, callbacks=[_FailAt(3)])
    assert load_checkpoint_file(run / "checkpoints" / "interrupted.ckpt")["global_step"] == 3


def test_status_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    good = TrainingStatus(mode="sft", steps=4, max_steps=4, examples=32, seconds=1.0)
    good.save(tmp_path)

    def torn_write(self, text, *args, **kwargs):  # a write that dies half-way (full disk, kill)
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", torn_write)
    with pytest.raises(OSError):
        TrainingStatus(mode="sft", steps=2, max_steps=4, examples=16, seconds=1.0).save(tmp_path)
    monkeypatch.undo()
    assert TrainingStatus.load(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["training_status.json"]
    assert json.loads((tmp_path / "training_status.json").read_text())["world_size"] == 1
