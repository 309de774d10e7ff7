"""``training.mode: lora``: one LoRA shared by every sample (the paper's oracle / multi-task LoRA
baselines), through the same batched LoRA path as T2L so comparisons are fair."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from t2l_framework.console import say
from t2l_framework.training.modes.base import HypernetworkFactory, Trainable, register
from t2l_framework.training.modes.instances import InstanceMode

if TYPE_CHECKING:
    from torch import nn

    from t2l_framework.lora.batched import LoraInjection
    from t2l_framework.lora.weights import LoraWeights
    from t2l_framework.run_folder import RunFolder
    from t2l_framework.training.module import T2LModule


@register
class LoraMode(InstanceMode):
    """A learned LoRA (``LearnedLora``), saved as a PEFT folder (``adapter/``)."""

    name = "lora"
    trains = Trainable.ONE_LORA
    end_of_training_table = True

    def trainable(self, datamodule, injection: LoraInjection | None, hypernetwork: HypernetworkFactory) -> nn.Module:
        from t2l_framework.training.module import LearnedLora

        lora = self.cfg.lora
        return LearnedLora(injection.shapes, int(lora.rank), float(lora.alpha), bool(lora.use_rslora))

    def adapters(self, module: T2LModule, batch: dict) -> LoraWeights:
        return module.generator()

    def save(self, run: RunFolder, pieces, trainer) -> Path:
        from t2l_framework.lora.peft_io import export_peft_adapter

        weights = pieces.trainable().to("cpu").detach()
        export_peft_adapter(weights, run.adapter, self.cfg.base_model.name_or_path, paths=pieces.injection.paths)
        say(f"saved {run.adapter}")
        return run.adapter
