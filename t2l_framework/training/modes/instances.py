"""``InstanceMode``: the modes that train on task instances through the frozen base LLM
(``sft``, ``lora``, ``library``): a ``T2LDataModule`` batch, cross-entropy on answer tokens."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from t2l_framework.console import say
from t2l_framework.training.modes.base import TrainingMode

if TYPE_CHECKING:
    import torch

    from t2l_framework.data.datamodule import T2LDataModule
    from t2l_framework.llm.loading import LoadedModel
    from t2l_framework.lora.weights import LoraWeights
    from t2l_framework.training.module import T2LModule


class InstanceMode(TrainingMode):
    """Batches of tasks' instances, prompts formatted for the base model; the loss is the
    answer tokens' cross-entropy (label smoothing in training steps only)."""

    def datamodule(self, total_batches: int, base: LoadedModel | None) -> T2LDataModule:
        from t2l_framework.data.datamodule import T2LDataModule

        cfg = self.cfg
        fmt = partial(base.family.format_prompt, base.tokenizer, chat_template=bool(cfg.base_model.chat_template))
        dm = T2LDataModule(cfg.data, base.tokenizer, lambda user, system="": fmt(user, system),
                           int(cfg.training.seed), self.recipe_file, total_batches)
        dm.setup()
        say(f"{len(dm.train_task_ids)} training tasks, {len(dm.descriptions)} descriptions")
        return dm

    def answer_loss(self, module: T2LModule, batch: dict, weights: LoraWeights,
                    train: bool) -> tuple[torch.Tensor, dict]:
        """(cross-entropy, logs of it and of the token accuracy)."""
        smoothing = module.settings.label_smoothing if train else 0.0
        ce, acc = module.lm_loss(batch, weights, smoothing)
        return ce, {"ce": ce, "token_acc": acc}

    def loss(self, module: T2LModule, batch: dict, weights: LoraWeights, train: bool) -> tuple[torch.Tensor, dict]:
        ce, logs = self.answer_loss(module, batch, weights, train)
        logs["loss"] = ce
        return ce, logs
