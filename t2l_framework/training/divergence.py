"""Divergence: a run whose training loss ended far above where it started, or went non-finite.

Such a run trains all its steps and writes every file, so nothing else tells it from a good one:
its adapters are noise and its report rows look like a weak method. (The 288-step demo on seed 7
went from loss 5.2 to 28 within 20 steps and ended at 41, and its table printed as if T2L had
failed.) ``LossTracker`` (fed by the callback ``loss_watch`` builds) keeps the loss of the first
batch (the untrained model's: no update came before it) and the mean of the last ``WINDOW``;
``TrainingStatus`` records both, every report row the run trained says "DIVERGED", ``t2l fit``
prints a banner and exits with ``EXIT_DIVERGED``.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 10  # batches averaged at the end (single losses of 8 rows are noisy)
RATIO = 2.0  # the end's mean loss above this multiple of the untrained one: diverged
EXIT_DIVERGED = 4  # t2l fit's exit status for a run that diverged


def diverged(loss_start: float | None, loss_end: float | None) -> bool:
    """Whether a run that started at mean loss ``loss_start`` and ended at ``loss_end`` diverged:
    a non-finite loss (recorded as NaN), or an end above ``RATIO`` x the start. None = not
    measured (a run of at most ``WINDOW`` batches), which alone is never called diverged."""
    if any(v is not None and not math.isfinite(v) for v in (loss_start, loss_end)):
        return True
    if loss_start is None or loss_end is None:
        return False
    return loss_end > RATIO * max(loss_start, 1e-8)


class LossTracker:
    """The first batch's training loss and the mean of the last ``window`` (a resumed run keeps
    its first segment's start: ``start``)."""

    def __init__(self, window: int = WINDOW, start: float | None = None):
        self.window = window
        self.last: deque[float] = deque(maxlen=window)
        self.start = start
        self.resumed = start is not None
        self.count = 0  # finite losses seen
        self.non_finite = False

    def add(self, value: float) -> None:
        """One batch's training loss."""
        if not math.isfinite(value):
            self.non_finite = True
            return
        if self.start is None:
            self.start = value
        self.count += 1
        self.last.append(value)

    def losses(self) -> tuple[float | None, float | None]:
        """(loss at the start, mean loss at the end); NaN at the end if a loss was non-finite; None
        at the end until more than ``window`` batches ran (``window`` after a resume)."""
        if self.non_finite:
            return self.start, math.nan
        need = self.window if self.resumed else self.window + 1
        return self.start, (_mean(self.last) if self.count >= need else None)


def loss_watch(start: float | None = None):
    """A Lightning callback feeding a ``LossTracker`` (its ``tracker``) every training batch's loss.
    Lightning is imported here, not at module import, so reports can read statuses without it."""
    from lightning.pytorch.callbacks import Callback

    class LossWatch(Callback):
        def __init__(self):
            self.tracker = LossTracker(start=start)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.tracker.add(float(loss.detach().float()))

    return LossWatch()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
