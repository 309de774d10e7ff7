"""``training.mode: library``: one LoRA per training task, all in one run (``training/library.py``:
a bank gathered by each sample's ``task_idx``), saved as a LoRA library folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from t2l_framework.training.modes.base import HypernetworkFactory, Trainable, register
from t2l_framework.training.modes.instances import InstanceMode

if TYPE_CHECKING:
    from torch import nn

    from t2l_framework.lora.batched import LoraInjection
    from t2l_framework.lora.weights import LoraWeights
    from t2l_framework.run_folder import RunFolder
    from t2l_framework.training.module import T2LModule


@register
class LibraryMode(InstanceMode):
    """A ``TaskLoraBank`` over the data module's training tasks, written to ``RunFolder.library``
    (the folder ``training.mode: recon`` reads as ``data.lora_library``)."""

    name = "library"
    trains = Trainable.TASK_LORAS

    def trainable(self, datamodule, injection: LoraInjection | None, hypernetwork: HypernetworkFactory) -> nn.Module:
        from t2l_framework.training.library import TaskLoraBank

        lora = self.cfg.lora
        return TaskLoraBank(injection.shapes, datamodule.train_task_ids, int(lora.rank), float(lora.alpha),
                            bool(lora.use_rslora), init=str(self.cfg.training.library_init))

    def adapters(self, module: T2LModule, batch: dict) -> LoraWeights:
        return module.generator(batch["task_idx"])

    def save(self, run: RunFolder, pieces, trainer) -> Path:
        from t2l_framework.training.library import save_library

        return save_library(self.cfg, run, pieces, trainer)
