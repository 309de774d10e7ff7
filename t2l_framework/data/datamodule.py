"""Where T2L's batches come from: a LightningDataModule over many tasks and their descriptions.

Training follows the paper: each batch samples ``n_tasks_per_batch`` distinct training tasks,
``n_samples_per_task`` instances of each, and one random *training* description per sample.
Batch i is a pure function of (seed, i), so a resumed run continues the stream exactly; under
DDP / DeepSpeed / fsdp_base each rank reads its own slice of it (``data.stream``).
With ``data.length_grouping`` the rows of a window of batches are regrouped by length
(``length_groups``): the same examples, less padding per step.

Every batch carries ``desc_idx`` into ``T2LDataModule.descriptions`` and ``task_idx`` into
``T2LDataModule.task_ids``. ``descriptions`` holds exactly the texts training reads (deduplicated),
so the encoder embeds nothing in vain: every training description of the training tasks, and of
the held-out descriptions only those that validation picks. The end-of-training items
(``eval_items``: ``EvalItem``) carry their description as text: the evaluation harness makes
their adapters through the encoder, as ``t2l eval`` does.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from t2l_framework.config import DataConfig
from t2l_framework.data.encoding import FormatPrompt, encode_examples, pad_batch, pad_id
from t2l_framework.data.length_groups import group_by_length
from t2l_framework.data.stream import ResumableStream, trainer_share
from t2l_framework.data.task_sets import check_task_set, task_set_ids, task_sources
from t2l_framework.data.tasks import Task, expand_task_ids, load_tasks, split_descriptions
from t2l_framework.errors import T2LError, did_you_mean

Example = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass(frozen=True)
class EvalItem:
    """One held-out item of a run's own split, as text (the harness formats and tokenizes it).

    id: ``TASK-K``, the task's K-th held-out instance. input: the user turn (the instance input).
    answers: the reference outputs. description: the held-out description it is asked with (item
    K of a task takes the task's held-out description K, cycling).
    """

    id: str
    task: str
    input: str
    answers: tuple[str, ...]
    description: str


class TrainBatches(Dataset):
    """Map-style dataset whose item i is the whole training batch i (use batch_size=None).

    group_window > 1 turns on length grouping: the rows of batches [w*W, (w+1)*W) (clipped at
    ``length``) are regrouped by token length (``group_by_length``), so batch i is still a
    pure function of (seed, i) and a resumed run continues the stream exactly.

    tokens_per_step > 0 (throughput mode): the rows of W draws are packed into batches of at
    most that many padded tokens, so a window yields a varying number of batches; batch i is
    found by counting the batches of the windows before it (cheap: no tokenising, no padding).
    """

    def __init__(self, examples: list[list[Example]], desc_idx: list[list[int]], n_tasks: int,
                 n_samples: int, seed: int, length: int, pad_token_id: int, group_window: int = 1,
                 tokens_per_step: int = 0):
        self.examples, self.desc_idx = examples, desc_idx
        self.n_tasks, self.n_samples, self.seed = n_tasks, n_samples, seed
        self.length, self.pad_token_id, self.group_window = length, pad_token_id, group_window
        self.tokens_per_step = tokens_per_step
        self._window: tuple[int, list] = (-1, [])  # (window index, its regrouped batches)
        self._starts = [0]  # throughput mode: stream index of each window's first batch, as far as counted

    def __len__(self) -> int:
        return self.length

    def draw(self, i: int) -> list[tuple[Example, int, int]]:
        """The (example, desc_idx, task_idx) rows of batch i as the paper draws them: distinct
        tasks, ``n_samples`` instances each, one random training description per row."""
        # A fresh generator per batch: batch i never depends on which batches came before it.
        rng = random.Random(self.seed * 1_000_003 + i)
        rows = []
        for t in rng.sample(range(len(self.examples)), self.n_tasks):
            pool = self.examples[t]
            if len(pool) >= self.n_samples:
                picks = rng.sample(range(len(pool)), self.n_samples)
            else:
                picks = [rng.randrange(len(pool)) for _ in range(self.n_samples)]
            rows += [(pool[j], rng.choice(self.desc_idx[t]), t) for j in picks]
        return rows

    def _window_batches(self, w: int) -> list[list[tuple[Example, int, int]]]:
        """The regrouped batches of window w (the draws w*W ... (w+1)*W - 1)."""
        if self._window[0] != w:
            start = w * self.group_window
            stop = start + self.group_window
            if not self.tokens_per_step:  # the run's last window holds only the batches it reaches
                stop = min(stop, self.length)
            rows = [row for b in range(start, stop) for row in self.draw(b)]
            rng = random.Random(f"{self.seed}-length-groups-{w}")
            self._window = (w, group_by_length(rows, [len(r[0][0]) for r in rows], self.n_tasks * self.n_samples,
                                               rng, self.tokens_per_step))
        return self._window[1]

    def _grouped(self, i: int) -> list[tuple[Example, int, int]]:
        if not self.tokens_per_step:
            w = i // self.group_window
            return self._window_batches(w)[i - w * self.group_window]
        while self._starts[-1] <= i:
            self._starts.append(self._starts[-1] + len(self._window_batches(len(self._starts) - 1)))
        w = bisect.bisect_right(self._starts, i) - 1
        return self._window_batches(w)[i - self._starts[w]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rows = self._grouped(i) if self.group_window > 1 or self.tokens_per_step else self.draw(i)
        batch = pad_batch([ex for ex, _, _ in rows], self.pad_token_id)
        batch["desc_idx"] = torch.tensor([d for _, d, _ in rows], dtype=torch.long)
        batch["task_idx"] = torch.tensor([t for _, _, t in rows], dtype=torch.long)
        return batch


def _collate_eval(items: list[dict], pad_token_id: int) -> dict:
    batch = pad_batch([it["example"] for it in items], pad_token_id)
    batch["desc_idx"] = torch.tensor([it["desc_idx"] for it in items], dtype=torch.long)
    batch["task_idx"] = torch.tensor([it["task_idx"] for it in items], dtype=torch.long)
    batch["answers"] = [it["answers"] for it in items]
    return batch


def _round_robin(per_task: list[list]) -> list:
    """Interleave the tasks' lists, so a validation limited to a few batches still spans many tasks."""
    out, k = [], 0
    while any(k < len(lst) for lst in per_task):
        out += [lst[k] for lst in per_task if k < len(lst)]
        k += 1
    return out


class T2LDataModule(ResumableStream, L.LightningDataModule):
    """Training batches, validation batches and end-of-training evaluation items.

    ``format_prompt(user, system) -> str`` applies the base model's chat format; the user turn
    is the instance input alone (the task is described to the hypernetwork, not in the prompt).
    total_batches: training micro-batches per rank; the stream holds that many times the world
    size (``data.stream``). ``eval_items`` needs neither tokenizer nor format_prompt.
    """

    def __init__(self, cfg: DataConfig, tokenizer, format_prompt: FormatPrompt, seed: int,
                 recipe_file: Optional[Path] = None, total_batches: int = 10**6):
        super().__init__()
        self.cfg, self.tokenizer, self.format_prompt = cfg, tokenizer, format_prompt
        self.seed, self.recipe_file, self.total_batches = seed, recipe_file, total_batches
        self.tasks: dict[str, Task] = {}
        self.task_ids: list[str] = []
        self.train_task_ids: list[str] = []
        self.eval_task_ids: list[str] = []
        self.descriptions: list[str] = []
        self.train_desc_idx: dict[str, list[int]] = {}
        # Texts, not indices: only the ones validation picks are embedded.
        self.heldout_descriptions: dict[str, list[str]] = {}
        self._ready = False

    # ---- setup -------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Load and select tasks, split descriptions, pre-tokenise (once; later calls do nothing)."""
        if self._ready:
            return
        cfg = self.cfg
        self._split()
        self.pad_token_id = pad_id(self.tokenizer)
        self._train_examples = []
        for tid in self.train_task_ids:
            instances = self.tasks[tid].train
            if cfg.max_train_instances > 0:
                instances = instances[: cfg.max_train_instances]
            self._train_examples.append(self._encode([i.input for i in instances], [i.outputs[0] for i in instances]))
        self._val_items = [
            {"example": ex, "desc_idx": d, "task_idx": t, "answers": list(it.answers)}
            for (t, it, d), ex in zip(self._val_pairs, self._encode([it.input for _, it, _ in self._val_pairs],
                                                                    [it.answers[0] for _, it, _ in self._val_pairs]))
        ]
        self._ready = True

    def _split(self) -> None:
        """Select tasks, split their descriptions and pick the held-out items (no tokenizer needed)."""
        if self.task_ids:
            return
        cfg = self.cfg
        self._select_tasks()
        desc_index: dict[str, int] = {}

        def index(texts: Sequence[str]) -> list[int]:
            return [desc_index.setdefault(d, len(desc_index)) for d in texts]

        for tid in self.train_task_ids:
            train_d, held_d = split_descriptions(self.tasks[tid], cfg.holdout_descriptions, self.seed,
                                                 int(cfg.max_descriptions_per_task))
            self.train_desc_idx[tid] = index(train_d)
            # A one-description task has nothing to hold out; validate it on its training one.
            self.heldout_descriptions[tid] = held_d or train_d
        for tid in self.eval_task_ids:
            task = self.tasks[tid]
            self.heldout_descriptions[tid] = list(task.eval_descriptions or task.descriptions)
        self.task_ids = self.train_task_ids + self.eval_task_ids
        seen = self._held_out(self.train_task_ids)
        # validation: the seen items, their descriptions embedded with the training ones
        self._val_pairs = _round_robin([[(self.task_ids.index(it.task), it, d)
                                         for it, d in zip(items, index([it.description for it in items]))]
                                        for items in seen])
        self._items = {"seen": _round_robin(seen), "unseen": _round_robin(self._held_out(self.eval_task_ids))}
        self.descriptions = list(desc_index)

    def _select_tasks(self) -> None:
        cfg = self.cfg
        exclude = expand_task_ids(cfg.exclude_tasks, self.recipe_file)
        train_ids = expand_task_ids(cfg.train_tasks, self.recipe_file)
        eval_ids = expand_task_ids(cfg.eval_tasks, self.recipe_file)
        both = sorted(set(train_ids) & set(eval_ids))
        if both:
            raise T2LError(f"data.eval_tasks must be never-trained tasks, but {both} are also in data.train_tasks")
        if cfg.task_set:  # before reading instances: a missing set is one clear error, not a KeyError later
            check_task_set(cfg, self.recipe_file)
        # Without train_tasks, a task set is the training list; evaluation defaults to the unseen-role tasks.
        set_ids = [t for t in task_set_ids(cfg.task_set, self.recipe_file) if t not in set(exclude)] \
            if cfg.task_set and not train_ids else []
        (tasks_file, instances_file), *extra = task_sources(cfg, self.recipe_file)
        include = (train_ids + eval_ids) if train_ids else None
        tasks = load_tasks(tasks_file, instances_file, include=include, exclude=exclude, extra=extra)
        for tid in eval_ids:
            if tid not in tasks:
                raise T2LError(f"data.eval_tasks: task '{tid}' is not in {tasks_file} (or is excluded)"
                               f"{did_you_mean(tid, tasks)}")
        if include is None:
            # Defaults follow the T2L split: train on every training-role task, evaluate the unseen ones.
            train_ids = set_ids or [t for t, task in tasks.items() if "train" in task.role and t not in eval_ids]
            eval_ids = eval_ids or [t for t, task in tasks.items() if task.role == "eval_unseen"]
        for tid in train_ids:
            if not tasks[tid].train:
                raise T2LError(f"training task '{tid}' has no 'train' instances in {instances_file}")
        for tid in eval_ids:
            if not tasks[tid].test:
                raise T2LError(f"evaluation task '{tid}' has no 'test' instances in {instances_file}")
        if cfg.n_tasks_per_batch > len(train_ids):
            raise T2LError(f"data.n_tasks_per_batch = {cfg.n_tasks_per_batch}, but there are only "
                           f"{len(train_ids)} training tasks (each batch draws distinct tasks)")
        self.tasks, self.train_task_ids, self.eval_task_ids = tasks, train_ids, eval_ids

    def _encode(self, inputs: Sequence[str], answers: Sequence[str]) -> list[Example]:
        prompts = [self.format_prompt(text, self.cfg.system_prompt) for text in inputs]
        return encode_examples(self.tokenizer, prompts, answers, self.cfg.max_prompt_tokens, self.cfg.max_answer_tokens,
                               int(self.cfg.max_total_tokens))

    def _held_out(self, task_ids: list[str]) -> list[list[EvalItem]]:
        """Per task of ``task_ids``: its held-out items in a fixed order; item K takes the task's
        held-out description K (cycling)."""
        limit = self.cfg.max_eval_instances
        per_task = []
        for tid in task_ids:
            descs = self.heldout_descriptions[tid]
            test = self.tasks[tid].test[:limit] if limit > 0 else self.tasks[tid].test
            per_task.append([EvalItem(f"{tid}-{k}", tid, inst.input, tuple(inst.outputs), descs[k % len(descs)])
                             for k, inst in enumerate(test)])
        return per_task

    # ---- loaders -------------------------------------------------------------------------
    def train_dataset(self) -> TrainBatches:
        """The whole stream: ``total_batches`` micro-batches for each rank of the trainer's world."""
        self.setup()
        world = trainer_share(getattr(self, "trainer", None))[2]
        return TrainBatches(
            self._train_examples,
            [self.train_desc_idx[t] for t in self.train_task_ids],
            self.cfg.n_tasks_per_batch, self.cfg.n_samples_per_task, self.seed, self.total_batches * world,
            self.pad_token_id,
            int(self.cfg.length_grouping_window) if self.cfg.length_grouping or self.cfg.tokens_per_step else 1,
            int(self.cfg.tokens_per_step),
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's slice of the stream (``StreamSampler``), after the micro-batches a restored
        run already consumed (global_step x accumulation on every rank)."""
        return DataLoader(self.train_dataset(), batch_size=None, sampler=self.stream_sampler(self.total_batches),
                          num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Held-out instances of the training tasks, each with a held-out description."""
        self.setup()
        return DataLoader(self._val_items, batch_size=self.cfg.n_tasks_per_batch * self.cfg.n_samples_per_task,
                          shuffle=False, collate_fn=partial(_collate_eval, pad_token_id=self.pad_token_id),
                          num_workers=self.cfg.num_workers)

    # ---- end-of-training evaluation ------------------------------------------------------
    def eval_items(self, split: str) -> list[EvalItem]:
        """The run's own held-out items: split "seen": held-out instances of the training tasks with
        held-out descriptions; "unseen": test instances of ``eval_tasks`` with their evaluation
        descriptions. Needs no tokenizer: ``t2l eval RUN`` reads them without loading the data's batches."""
        if split not in ("seen", "unseen"):
            raise T2LError(f"eval split '{split}' must be 'seen' or 'unseen'")
        self._split()
        return list(self._items[split])
