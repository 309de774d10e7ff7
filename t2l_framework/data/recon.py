"""Reconstruction training data: a library of task LoRAs and their tasks' descriptions.

The library (``lora.library.load_lora_library``: one PEFT adapter folder per task, named by
task id) is loaded by the recon mode and handed in; its adapters are the regression targets.
Batch i samples ``n_tasks_per_batch`` library tasks with one training description each.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from t2l_framework.config import resolve_path
from t2l_framework.data.stream import ResumableStream, trainer_share
from t2l_framework.data.tasks import load_tasks, split_descriptions


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
    """Descriptions of the library's tasks; batches carry task_idx (library row) and desc_idx.

    task_ids: the library's tasks, in row order; targets: its adapters (``LoraWeights``, one row
    per task), which the recon loss regresses and its report compares against.
    """

    def __init__(self, cfg, seed: int, task_ids: list[str], targets, recipe_file: Path | None = None,
                 total_batches: int = 10**6):
        super().__init__()
        self.cfg, self.seed, self.total_batches = cfg, seed, total_batches
        self.task_ids, self.targets = list(task_ids), targets
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
