"""``training.mode: recon``: the hypernetwork regresses a library of task LoRAs from their tasks'
descriptions with the reference's L1 losses; no base model runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from t2l_framework.console import say
from t2l_framework.training.modes.base import HypernetworkFactory, Trainable, TrainingMode, register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from t2l_framework.data.recon import ReconDataModule
    from t2l_framework.lora.weights import LoraWeights
    from t2l_framework.run_folder import RunFolder
    from t2l_framework.training.module import T2LModule


@register
class ReconMode(TrainingMode):
    """Reconstruction of ``data.lora_library``; saves the hypernetwork and a report of how well it
    reproduces the library (``training/recon_error.py``)."""

    name = "recon"
    trains = Trainable.HYPERNETWORK
    data_paths = ("data.tasks_file",)
    produced_paths = ("data.lora_library",)  # a library run's folder, read (and checked) at fit time
    needs_base_model = False
    reads_instances = False

    def __init__(self, cfg, recipe_file: Path | None = None):
        super().__init__(cfg, recipe_file)
        self.recon_loss, self.delta_w_scaling = str(cfg.training.recon_loss), float(cfg.training.delta_w_scaling)

    def datamodule(self, total_batches: int, base=None) -> ReconDataModule:
        from t2l_framework.config import resolve_path
        from t2l_framework.data.recon import ReconDataModule
        from t2l_framework.lora.library import load_lora_library

        cfg = self.cfg
        task_ids, targets = load_lora_library(resolve_path(cfg.data.lora_library, self.recipe_file), cfg.lora)
        return ReconDataModule(cfg.data, int(cfg.training.seed), task_ids, targets, self.recipe_file, total_batches)

    def trainable(self, datamodule: ReconDataModule, injection, hypernetwork: HypernetworkFactory) -> nn.Module:
        from t2l_framework.lora.library import library_shapes

        net = hypernetwork(library_shapes(datamodule.targets))
        if self.recon_loss == "factors_z":  # the head emits z-scores of the library (the reference's pred_z_score)
            net.set_output_standardisation(datamodule.targets)
        return net

    def loss_targets(self, datamodule: ReconDataModule) -> tuple[dict, dict]:
        return datamodule.targets.A, datamodule.targets.B

    def loss(self, module: T2LModule, batch: dict, weights: LoraWeights, train: bool) -> tuple[torch.Tensor, dict]:
        """``recon_l1`` between the generated adapters and the library adapters of the batch's tasks."""
        from t2l_framework.training.module import recon_l1

        A, B = module.recon_targets
        idx = batch["task_idx"]
        loss = recon_l1(weights, {m: a[idx] for m, a in A.items()}, {m: b[idx] for m, b in B.items()},
                        self.recon_loss, self.delta_w_scaling, self._library_std(module.generator))
        return loss, {"loss": loss}

    def _library_std(self, net) -> tuple[dict, dict] | None:
        """factors_z: the per-entry std the network's output scale holds, per module type."""
        if self.recon_loss != "factors_z":
            return None
        scale, modules = net.output_scale, net.shapes.modules
        return ({m: getattr(scale, f"A{i}") for i, m in enumerate(modules)},
                {m: getattr(scale, f"B{i}") for i, m in enumerate(modules)})

    def save(self, run: RunFolder, pieces, trainer) -> Path:
        from t2l_framework.training.recon_error import write_recon_report

        pieces.trainable.save_pretrained(run.hypernet)
        say(f"saved {run.hypernet}")
        write_recon_report(run, pieces.trainable, pieces.embeddings, pieces.datamodule)
        return run.hypernet
