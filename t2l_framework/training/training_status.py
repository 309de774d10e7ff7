"""``TrainingStatus``: how far one ``t2l fit`` got, kept in its run folder (``training_status.json``)
so reports can say what work every row they show was trained with."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from t2l_framework.atomic import atomic_file
from t2l_framework.errors import T2LError
from t2l_framework.run_folder import RunFolder
from t2l_framework.training.divergence import diverged


def _folder(run: RunFolder | Path) -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder(run)


@dataclass(frozen=True)
class TrainingStatus:
    """How far one ``t2l fit`` got.

    steps: optimizer steps done (``trainer.global_step``); max_steps: what the recipe asked.
    examples: training examples consumed (steps x accumulation x devices x rows per batch).
    seconds: wall time of training (``Trainer.fit``), summed over the segments of a resumed run
    that ended normally (a segment killed by SIGTERM writes no status, so its time is not known).
    stopped_by: "max_time" when the safety net ended the run, "" otherwise.
    world_size: training processes (each read its own slice of the data stream; a resume must
    use as many: ``data.stream``).
    loss_start, loss_end: the first batch's training loss (the untrained model's) and the mean
    of the last 10 (``training.divergence``; None when the run was too short to measure, NaN at
    the end when a loss was non-finite).
    """

    mode: str
    steps: int
    max_steps: int
    examples: int
    seconds: float
    max_time: str = ""
    stopped_by: str = ""
    allow_cut_short: bool = False
    world_size: int = 1
    loss_start: float | None = None
    loss_end: float | None = None

    @property
    def cut_short(self) -> bool:
        return self.steps < self.max_steps

    @property
    def diverged(self) -> bool:
        return diverged(self.loss_start, self.loss_end)

    def describe(self) -> str:
        """One phrase for reports: '480 of 480 steps (3,840 examples), 13 min 20 s' or the cut-short line."""
        took = format_seconds(self.seconds)
        if self.cut_short:
            by = f" by max_time {self.max_time}" if self.stopped_by == "max_time" else ""
            text = f"cut short at step {self.steps} of {self.max_steps}{by} ({self.examples:,} examples, {took})"
        else:
            text = f"{self.steps} of {self.max_steps} steps ({self.examples:,} examples), {took}"
        if self.diverged:
            start = "?" if self.loss_start is None else f"{self.loss_start:.2f}"
            text = f"DIVERGED (training loss {start} -> {self.loss_end:.2f}): {text}"
        return text

    def save(self, run: RunFolder | Path) -> Path:
        path = _folder(run).status
        with atomic_file(path) as tmp:  # a reader never sees half a status
            tmp.write_text(json.dumps(asdict(self), indent=1, allow_nan=True) + "\n")
        return path

    @classmethod
    def load(cls, run: RunFolder | Path) -> "TrainingStatus | None":
        """The status recorded in the run folder ``run``; None when it has none (not trained by ``t2l fit``)."""
        path = _folder(run).status
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (ValueError, TypeError, KeyError) as exc:
            raise T2LError(f"{path}: not a training status file ({exc})") from None


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
