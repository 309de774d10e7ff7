"""``training.mode: sft``: the hypernetwork turns each sample's task description into its LoRA;
cross-entropy on the answers, plus an L2 penalty on the generated factors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.training.modes.base import HypernetworkFactory, Trainable, register
from t2l_framework.training.modes.instances import InstanceMode

if TYPE_CHECKING:
    import torch
    from torch import nn

    from t2l_framework.lora.batched import LoraInjection
    from t2l_framework.lora.weights import LoraWeights
    from t2l_framework.run_folder import RunFolder
    from t2l_framework.training.module import T2LModule


@register
class SftMode(InstanceMode):
    """Supervised fine-tuning of a T2L hypernetwork (the paper's main recipe)."""

    name = "sft"
    trains = Trainable.HYPERNETWORK
    end_of_training_table = True

    def __init__(self, cfg, recipe_file: Path | None = None):
        super().__init__(cfg, recipe_file)
        t = cfg.training
        self.l2_penalty, self.l2_reduction = float(t.l2_penalty), str(t.l2_reduction)
        self.mtlora_offset = str(t.mtlora_offset)

    def trainable(self, datamodule, injection: LoraInjection | None, hypernetwork: HypernetworkFactory) -> nn.Module:
        net = hypernetwork(injection.shapes)
        if self.mtlora_offset:
            self._start_from_offset(net)
        return net

    def _start_from_offset(self, net: nn.Module) -> None:
        """``training.mtlora_offset``: the hypernetwork's output starts from a fixed LoRA."""
        from t2l_framework.config import resolve_path
        from t2l_framework.lora.peft_io import import_peft_adapter

        folder = resolve_path(self.mtlora_offset, self.recipe_file)
        if (folder / "adapter" / "adapter_config.json").is_file():
            folder = folder / "adapter"  # a multi-task LoRA run folder
        offset = import_peft_adapter(folder)
        try:
            net.set_output_offset(offset)
        except T2LError as exc:
            raise T2LError(f"training.mtlora_offset {folder}: {exc}") from None
        say(f"the hypernetwork's output starts from the LoRA in {folder}")

    def loss(self, module: T2LModule, batch: dict, weights: LoraWeights, train: bool) -> tuple[torch.Tensor, dict]:
        from t2l_framework.training.module import generated_l2

        loss, logs = self.answer_loss(module, batch, weights, train)
        if self.l2_penalty > 0:
            reg = generated_l2(weights, self.l2_reduction)
            loss = loss + self.l2_penalty * reg
            logs["l2"] = reg
        logs["loss"] = loss
        return loss, logs

    def save(self, run: RunFolder, pieces, trainer) -> Path:
        pieces.trainable.save_pretrained(run.hypernet)
        say(f"saved {run.hypernet}")
        return run.hypernet
