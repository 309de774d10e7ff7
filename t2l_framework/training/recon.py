"""Reconstruction training data: a library of task LoRAs and their tasks' descriptions.

The library is a folder with one PEFT adapter folder per task, named by task id
(``lora_library/lol_140/adapter_config.json``...), as written by ``training.mode=lora``.
Batch i samples ``n_tasks_per_batch`` library tasks with one training description each.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from t2l_framework.config import resolve_path
from t2l_framework.data.stream import ResumableStream, trainer_share
from t2l_framework.data.tasks import load_tasks, split_descriptions
from t2l_framework.errors import T2LError
from t2l_framework.lora.peft_io import import_peft_adapter
from t2l_framework.lora.weights import LoraWeights, ModuleShapes


def load_lora_library(folder: Path, lora=None) -> tuple[list[str], LoraWeights]:
    """(task ids, LoraWeights with one row per task) from a folder of PEFT adapters.

    lora: the recipe's ``lora`` section; every adapter must have its rank and scaling
    (lora_alpha / r, or / sqrt(r) with use_rslora), since the generated adapters are applied
    with the recipe's and regressing factors made for another scaling learns the wrong delta W.
    """
    if not folder.is_dir():
        raise T2LError(f"data.lora_library: folder '{folder}' does not exist; a training.mode=library run writes one "
                       "(RUN/library, e.g. `t2l fit smollm2_library`)")
    dirs = sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())
    if not dirs:
        raise T2LError(f"data.lora_library: '{folder}' holds no PEFT adapter folders (task_id/adapter_config.json)")
    weights = [import_peft_adapter(d) for d in dirs]
    if lora is not None:
        want = LoraWeights({}, {}, int(lora.rank), float(lora.alpha), bool(lora.use_rslora))
        for d, w in zip(dirs, weights):
            if w.rank != want.rank or not math.isclose(w.scaling, want.scaling, rel_tol=1e-6):
                raise T2LError(
                    f"data.lora_library: {d / 'adapter_config.json'} has r={w.rank}, lora_alpha={w.alpha:g}, "
                    f"use_rslora={str(w.use_rslora).lower()} (scaling {w.scaling:.4g}), but the recipe's lora "
                    f"section has rank={want.rank}, alpha={want.alpha:g}, use_rslora={str(want.use_rslora).lower()} "
                    f"(scaling {want.scaling:.4g}); set lora.rank / lora.alpha / lora.use_rslora to match the library"
                )
    first = weights[0]
    for d, w in zip(dirs, weights):
        if w.modules != first.modules or w.rank != first.rank or any(
                w.A[m].shape != first.A[m].shape for m in first.modules):
            raise T2LError(f"data.lora_library: adapter '{d}' has a different rank or shapes than '{dirs[0]}'")
    return [d.name for d in dirs], LoraWeights.cat(weights)


def library_shapes(weights: LoraWeights) -> ModuleShapes:
    return ModuleShapes(weights.n_layers, {m: (a.shape[-1], weights.B[m].shape[-2]) for m, a in weights.A.items()})


class _Batches(Dataset):
    def __init__(self, desc_idx: list[list[int]], n_tasks: int, seed: int, length: int):
        self.desc_idx, self.n_tasks, self.seed, self.length = desc_idx, n_tasks, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + i)
        tasks = rng.sample(range(len(self.desc_idx)), min(self.n_tasks, len(self.desc_idx)))
        return {"task_idx": torch.tensor(tasks), "desc_idx": torch.tensor([rng.choice(self.desc_idx[t]) for t in tasks])}


class ReconDataModule(ResumableStream, L.LightningDataModule):
    """Descriptions of the library's tasks; batches carry task_idx (library row) and desc_idx."""

    def __init__(self, cfg, seed: int, recipe_file: Path | None = None, total_batches: int = 10**6, lora=None):
        super().__init__()
        self.cfg, self.seed, self.total_batches = cfg, seed, total_batches
        self.task_ids, self.targets = load_lora_library(resolve_path(cfg.lora_library, recipe_file), lora)
        tasks = load_tasks(resolve_path(cfg.tasks_file, recipe_file), resolve_path(cfg.instances_file, recipe_file),
                           include=self.task_ids, exclude=list(cfg.exclude_tasks))
        self.descriptions: list[str] = []
        self.train_desc, self.val_desc = [], []
        for tid in self.task_ids:
            train, held = split_descriptions(tasks[tid], cfg.holdout_descriptions, seed, int(cfg.max_descriptions_per_task))
            self.train_desc.append(self._index(train))
            self.val_desc.append(self._index(held or train[:1]))

    def _index(self, texts: list[str]) -> list[int]:
        start = len(self.descriptions)
        self.descriptions.extend(texts)
        return list(range(start, len(self.descriptions)))

    def train_dataloader(self) -> DataLoader:
        """This rank's slice of a stream of ``total_batches`` micro-batches per rank (``data.stream``)."""
        world = trainer_share(getattr(self, "trainer", None))[2]
        ds = _Batches(self.train_desc, self.cfg.n_tasks_per_batch, self.seed, self.total_batches * world)
        return DataLoader(ds, batch_size=None, sampler=self.stream_sampler(self.total_batches))

    def val_dataloader(self) -> DataLoader:
        pairs = [(t, d) for t, ds in enumerate(self.val_desc) for d in ds]
        batches = [pairs[i:i + self.cfg.n_tasks_per_batch] for i in range(0, len(pairs), self.cfg.n_tasks_per_batch)]
        items = [{"task_idx": torch.tensor([t for t, _ in b]), "desc_idx": torch.tensor([d for _, d in b])} for b in batches]
        return DataLoader(items, batch_size=None)
