"""Step budgets: what a run trained against what its recipe asked for.

A recipe names its work in steps (``trainer.max_steps``): results then compare runs by the
work they did, not by how busy the machine was. ``trainer.max_time`` is only a safety net.
When it stops a run early the results are not the recipe's, so the run says so on stderr,
records it in the run folder's ``TrainingStatus`` (which the reports read to mark every row
that run trained) and ``t2l fit`` exits with ``EXIT_CUT_SHORT`` unless the recipe sets
``training.allow_cut_short``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from t2l_framework.run_folder import RunFolder
from t2l_framework.training.modes import mode_class
from t2l_framework.training.divergence import EXIT_DIVERGED, LossTracker
from t2l_framework.training.training_status import TrainingStatus

EXIT_CUT_SHORT = 3  # t2l fit's exit status for a run that max_time stopped before max_steps


def rows_per_step(cfg) -> int:
    """Training examples in one optimizer step of ``cfg`` on one device."""
    rows = int(cfg.data.n_tasks_per_batch)
    if mode_class(str(cfg.training.mode)).reads_instances:  # else a batch holds one row per task
        rows *= int(cfg.data.n_samples_per_task)
    return rows * int(cfg.trainer.accumulate_grad_batches)


def record(trainer, cfg, run: RunFolder, seconds: float, previous: TrainingStatus | None = None) -> TrainingStatus:
    """Write ``training_status.json`` after ``Trainer.fit`` returned; warn loudly if cut short.

    previous: the status of the run this one resumed (its seconds are added).
    """
    from lightning.pytorch.callbacks import Timer

    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
    steps = int(trainer.global_step)
    remaining = [t.time_remaining() for t in timers]
    timed_out = any(r is not None and r <= 0 for r in remaining)
    trackers = [c.tracker for c in trainer.callbacks if isinstance(getattr(c, "tracker", None), LossTracker)]
    loss_start, loss_end = trackers[0].losses() if trackers else (None, None)
    status = TrainingStatus(
        mode=str(cfg.training.mode), steps=steps, max_steps=int(cfg.trainer.max_steps),
        examples=steps * rows_per_step(cfg) * int(getattr(trainer, "world_size", 1) or 1),
        seconds=seconds + (previous.seconds if previous else 0.0),
        max_time=str(cfg.trainer.max_time or ""),
        stopped_by="max_time" if timed_out and steps < int(cfg.trainer.max_steps) else "",
        allow_cut_short=bool(cfg.training.allow_cut_short), world_size=int(getattr(trainer, "world_size", 1) or 1),
        loss_start=loss_start, loss_end=loss_end)
    status.save(run)
    if status.cut_short:
        warn_cut_short(status)
    if status.diverged:
        warn_diverged(status)
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


def warn_diverged(status: TrainingStatus) -> None:
    """A banner on stderr: a run whose loss blew up wrote every file, and must not pass for trained."""
    bar = "!" * 78
    start = "?" if status.loss_start is None else f"{status.loss_start:.2f}"
    print(f"{bar}\n[t2l] TRAINING DIVERGED: the training loss went from {start} (first batch) to "
          f"{status.loss_end:.2f} (mean of the last batches).\n[t2l] Its adapters are not trained; every report row it trained is "
          f"marked 'DIVERGED'. Lower training.lr,\n[t2l] lengthen training.warmup_steps, or change the seed, "
          f"and train again.\n{bar}", file=sys.stderr, flush=True)


def exit_status(run_dir: Path) -> int:
    """``t2l fit``'s exit status for a finished run: EXIT_DIVERGED if its loss diverged, else
    EXIT_CUT_SHORT if it was cut short and that is not allowed, else 0."""
    status = TrainingStatus.load(RunFolder(run_dir))
    if status is None:
        return 0
    if status.diverged:
        return EXIT_DIVERGED
    if not status.cut_short or status.allow_cut_short:
        return 0
    return EXIT_CUT_SHORT
