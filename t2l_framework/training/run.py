"""Training with Lightning on pieces the assembly layer built (``t2l_framework.assembly.fit``).

Writes into the run folder (``RunFolder`` knows its layout): ``recipe.yaml`` (resolved, atomic),
``logs/`` (CSV metrics; a resumed run appends), ``tb/`` (TensorBoard), ``checkpoints/``
(safetensors, atomic, also under DeepSpeed ZeRO 1/2; ``last.ckpt`` every
``checkpoint_every_n_steps`` and ``interrupted.ckpt`` on Ctrl-C / SIGTERM once a step was
trained), and ``training_status.json`` (``TrainingStatus``: steps done of ``max_steps``, examples,
wall time, cut short or not). The result itself is the mode's to write (``TrainingMode.save``).
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment

from t2l_framework.atomic import atomic_file
from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.run_folder import RunFolder
from t2l_framework.training.budget import record as record_status
from t2l_framework.training.checkpoint_io import remove_torn_files
from t2l_framework.training.divergence import loss_watch
from t2l_framework.training.training_status import TrainingStatus


class TrainingInterrupted(T2LError):
    """``fit`` was stopped by SIGTERM or Ctrl-C after its checkpoint was written.

    exit_code: what the shell convention gives that signal (143 = 128 + SIGTERM, 130 = 128 + SIGINT),
    so ``make`` and scripts do not take an interrupted run for a finished one."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _StopReason(Callback):
    """Remembers the exception Lightning stops on: SIGTERM and Ctrl-C both end as SystemExit there."""

    def __init__(self):
        self.exception: BaseException | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.exception = exception


def _interrupted(reason: _StopReason, trainer, run: RunFolder) -> TrainingInterrupted | None:
    exc = reason.exception
    if isinstance(exc, KeyboardInterrupt):
        name, code = "Ctrl-C", 130
    elif type(exc).__name__ == "SIGTERMException":
        name, code = "SIGTERM", 143
    else:
        return None
    saved = run.interrupted_checkpoint
    where = f"checkpoint {saved} written" if saved.is_file() else f"latest checkpoint in {run.checkpoints}"
    return TrainingInterrupted(f"stopped by {name} at step {trainer.global_step}; {where}: continue with --resume",
                               code)


def scan_checkpoints(ckpt_dir: Path) -> tuple[Path | None, list[Path]]:
    """(the checkpoint with the highest global step, the ``*.ckpt`` files that cannot be read)."""
    from t2l_framework.training.checkpoint_io import checkpoint_step

    best, best_step, unreadable = None, -1, []
    for p in sorted(Path(ckpt_dir).glob("*.ckpt")):
        try:
            # DeepSpeed stage 3 writes checkpoint folders (all runs of one strategy): newest wins there.
            step = checkpoint_step(p) if p.is_file() else int(p.stat().st_mtime)
        except Exception:  # noqa: BLE001 - a torn file is skipped and named, not fatal
            unreadable.append(p)
            continue
        if step > best_step:
            best, best_step = p, step
    return best, unreadable


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint with the highest global step (periodic or written on interruption)."""
    return scan_checkpoints(ckpt_dir)[0]


class _TrainedOnlyExceptionCheckpoint(OnExceptionCheckpoint):
    """``interrupted.ckpt`` on an exception, but only when this segment trained a step: a run that
    failed before its first step has nothing new, and its checkpoint (of step 0, or of the step it
    resumed from) would be taken for the newest state by the next ``--resume``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._first_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._first_step = int(trainer.global_step)  # restored by now when resuming

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._first_step is None or int(trainer.global_step) <= self._first_step:
            return
        super().on_exception(trainer, pl_module, exception)


class _AppendingCSVLogger(CSVLogger):
    """Lightning's CSV logger, but ``logs/metrics.csv`` keeps the rows of earlier segments of a
    resumed run (Lightning's writer deletes the file when its folder is not empty). Steps logged
    after the last checkpoint of an interrupted segment appear again for the resumed one."""

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # append under the existing header


def _trainer(cfg, run: RunFolder, extra_callbacks: list):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from t2l_framework.training.checkpoint_io import SafetensorsCheckpointIO
    from t2l_framework.training.strategies import DEEPSPEED_STRATEGIES, build_strategy

    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    run_dir, ckpt_dir = run.root, run.checkpoints
    strategy = build_strategy(t.pop("strategy"), t["accelerator"], t["precision"])
    deepspeed = cfg.trainer.strategy in DEEPSPEED_STRATEGIES
    callbacks = [
        # no version counter: a resumed run overwrites last.ckpt instead of adding last-v1.ckpt
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=cfg.training.checkpoint_every_n_steps,
                        save_last=True, save_top_k=1, monitor=None, auto_insert_metric_name=False,
                        enable_version_counter=False),
        _TrainedOnlyExceptionCheckpoint(dirpath=ckpt_dir, filename=run.interrupted_checkpoint.stem),
        LearningRateMonitor(logging_interval="step"),
        *extra_callbacks,
    ]
    loggers = [_AppendingCSVLogger(run_dir, name="", version=run.logs.name)]
    try:
        loggers.append(TensorBoardLogger(run_dir, name="", version=run.tensorboard.name))
    except ModuleNotFoundError:
        say("tensorboard is not installed; logging to CSV only")
    if t.get("val_check_interval") and t["val_check_interval"] > t["max_steps"] * t["accumulate_grad_batches"]:
        t["val_check_interval"] = None  # a short run validates once, at the end
    if deepspeed:
        t.pop("gradient_clip_val", None)  # DeepSpeed clips inside its engine
    return L.Trainer(
        **t, strategy=strategy, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir),
        # DeepSpeed ZeRO 1/2 write safetensors through their strategy (strategies._safetensors_zero_class)
        plugins=None if deepspeed else [SafetensorsCheckpointIO()], check_val_every_n_epoch=None,
        num_sanity_val_steps=0, max_epochs=-1,
    )


def prepare_run_folder(cfg, run: RunFolder, resume: bool, overwrite: bool) -> Path | None:
    """Make the run folder ready before minutes of model loading: drop torn checkpoints, find the
    one to resume from (returned), refuse to overwrite a run without ``overwrite``, write the recipe."""
    ckpt_dir, ckpt = run.checkpoints, None
    for torn in remove_torn_files(ckpt_dir):
        say(f"removed {torn}: a checkpoint whose writing was interrupted")
    if resume:
        ckpt, unreadable = scan_checkpoints(ckpt_dir)
        for path in unreadable:
            say(f"cannot read checkpoint {path} (torn, or not a t2l-framework checkpoint); skipped")
        if ckpt is None and unreadable:  # starting over would overwrite them: the user decides
            raise T2LError(f"--resume: no checkpoint in {ckpt_dir} can be read ({', '.join(p.name for p in unreadable)}); "
                           "move them away to keep them, or pass --overwrite to start again")
        if ckpt is None:
            say(f"--resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
        else:
            say(f"resuming from {ckpt}")
    elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        if not overwrite:
            raise T2LError(f"run folder {run.root} already has checkpoints; pass --resume to continue it, "
                           f"--overwrite to start again, or training.run_name=NAME for a new run")
        shutil.rmtree(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    with atomic_file(run.recipe) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg))
    return ckpt


def train(cfg, run: RunFolder, pieces, ckpt: Path | None = None, callbacks: list | None = None):
    """Fit ``pieces.trainable`` (see ``assembly.RunPieces``) with Lightning; returns the Trainer.

    Raises ``TrainingInterrupted`` when SIGTERM / Ctrl-C stopped it after a checkpoint."""
    from t2l_framework.training.module import T2LModule

    base, dm, mode = pieces.base, pieces.datamodule, pieces.mode
    module = T2LModule(cfg, pieces.trainable, base.model if base else None, pieces.injection, pieces.embeddings,
                       mode.loss_targets(dm), tokenizer=base.tokenizer if base else None, mode=mode)
    reason = _StopReason()
    previous = TrainingStatus.load(run) if ckpt else None
    watch = loss_watch(previous.loss_start if previous else None)  # read by record_status
    trainer = _trainer(cfg, run, [reason, watch, *(callbacks or [])])
    t0 = time.time()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    except SystemExit:  # Lightning's SIGTERMException, or its sys.exit(1) after Ctrl-C
        stop = _interrupted(reason, trainer, run)
        if stop is None:
            raise
        raise stop from None
    run.interrupted_checkpoint.unlink(missing_ok=True)  # superseded by the finished run's last.ckpt
    say(f"trained to step {trainer.global_step} in {time.time() - t0:.0f} s")
    if trainer.is_global_zero:  # one writer per run folder under DDP / fsdp_base
        record_status(trainer, cfg, run, time.time() - t0, previous)
    return trainer
