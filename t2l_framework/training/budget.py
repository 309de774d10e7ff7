"""Step budgets: what a run trained against what its recipe asked for.

A recipe names its work in steps (``trainer.max_steps``): results then compare runs by the
work they did, not by how busy the machine was. ``trainer.max_time`` is only a safety net.
When it stops a run early the results are not the recipe's, so the run says so on stderr,
records it in ``training_status.json`` in the run folder (which the reports read to mark every
row that run trained) and ``t2l fit`` exits with ``EXIT_CUT_SHORT`` unless the recipe sets
``training.allow_cut_short``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from t2l_framework.atomic import atomic_file
from t2l_framework.errors import T2LError

STATUS_FILE = "training_status.json"
EXIT_CUT_SHORT = 3  # t2l fit's exit status for a run that max_time stopped before max_steps


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

    @property
    def cut_short(self) -> bool:
        return self.steps < self.max_steps

    def describe(self) -> str:
        """One phrase for reports: '480 of 480 steps (3,840 examples), 13 min 20 s' or the cut-short line."""
        took = format_seconds(self.seconds)
        if self.cut_short:
            by = f" by max_time {self.max_time}" if self.stopped_by == "max_time" else ""
            return f"cut short at step {self.steps} of {self.max_steps}{by} ({self.examples:,} examples, {took})"
        return f"{self.steps} of {self.max_steps} steps ({self.examples:,} examples), {took}"

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / STATUS_FILE
        with atomic_file(path) as tmp:  # a reader never sees half a status
            tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> "TrainingStatus | None":
        """The status recorded in ``run_dir``; None when the folder has none (not trained by ``t2l fit``)."""
        path = Path(run_dir) / STATUS_FILE
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


def rows_per_step(cfg) -> int:
    """Training examples in one optimizer step of ``cfg`` on one device."""
    rows = int(cfg.data.n_tasks_per_batch)
    if cfg.training.mode != "recon":  # recon batches hold one row per task
        rows *= int(cfg.data.n_samples_per_task)
    return rows * int(cfg.trainer.accumulate_grad_batches)


def record(trainer, cfg, run_dir: Path, seconds: float, previous: TrainingStatus | None = None) -> TrainingStatus:
    """Write ``training_status.json`` after ``Trainer.fit`` returned; warn loudly if cut short.

    previous: the status of the run this one resumed (its seconds are added).
    """
    from lightning.pytorch.callbacks import Timer

    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
    steps = int(trainer.global_step)
    remaining = [t.time_remaining() for t in timers]
    timed_out = any(r is not None and r <= 0 for r in remaining)
    status = TrainingStatus(
        mode=str(cfg.training.mode), steps=steps, max_steps=int(cfg.trainer.max_steps),
        examples=steps * rows_per_step(cfg) * int(getattr(trainer, "world_size", 1) or 1),
        seconds=seconds + (previous.seconds if previous else 0.0),
        max_time=str(cfg.trainer.max_time or ""),
        stopped_by="max_time" if timed_out and steps < int(cfg.trainer.max_steps) else "",
        allow_cut_short=bool(cfg.training.allow_cut_short), world_size=int(getattr(trainer, "world_size", 1) or 1))
    status.save(run_dir)
    if status.cut_short:
        warn_cut_short(status)
    return status


def warn_cut_short(status: TrainingStatus) -> None:
    """A banner on stderr: a truncated run must not pass for a finished one."""
    bar = "!" * 78
    why = (f"the safety net trainer.max_time={status.max_time} stopped it" if status.stopped_by == "max_time"
           else "training stopped early")
    print(f"{bar}\n[t2l] TRAINING CUT SHORT at step {status.steps} of {status.max_steps}: {why}.\n"
          f"[t2l] Results from this run are not what the recipe asks for; every report row it trained is\n"
          f"[t2l] marked 'cut short'. Give it more time (trainer.max_time), fewer steps (trainer.max_steps),\n"
          f"[t2l] or continue it with --resume.\n{bar}", file=sys.stderr, flush=True)


def exit_status(run_dir: Path) -> int:
    """``t2l fit``'s exit status for a finished run: EXIT_CUT_SHORT if it was cut short and not allowed."""
    status = TrainingStatus.load(run_dir)
    if status is None or not status.cut_short or status.allow_cut_short:
        return 0
    return EXIT_CUT_SHORT
