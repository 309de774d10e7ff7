"""``t2l inspect`` as a Python function: a run's ``InspectIndex`` built from its recipe and data,
cached, and the ``Inspector`` over it.

The run knows its training tasks (``data.train_tasks`` or what the data selects) and which of
each task's descriptions were held out of training (``split_descriptions`` with the run's seed,
exactly as training split them). The index (training-description embeddings, the held-out
reference, each task's centroid embedding and adapter norms) is written once, atomically, to
``$T2L_CACHE/inspect/`` (default ``~/.cache/t2l/inspect``), keyed by the hypernetwork's
identity and the descriptions, so a read-only run (a Hub snapshot) is inspected the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from t2l_framework.assembly.lookups import load_recipe
from t2l_framework.atomic import atomic_file
from t2l_framework.caches import cache_dir
from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.run_folder import RunFolder
from t2l_framework.runtime.inspection import InspectIndex, Inspector, layer_norms, unit

INDEX_VERSION = 1


@dataclass
class RunTasks:
    """train: task -> (training descriptions, held-out descriptions); unseen: eval task -> descriptions."""

    train: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    unseen: dict[str, list[str]] = field(default_factory=dict)


def run_tasks(cfg, recipe_file: Path | None) -> RunTasks:
    """The run's tasks and description split, selected by the same code as training."""
    from t2l_framework.data.datamodule import T2LDataModule
    from t2l_framework.data.tasks import split_descriptions
    from t2l_framework.training.modes import mode_class

    if not mode_class(str(cfg.training.mode)).reads_instances:
        raise T2LError(f"{recipe_file}: a training.mode={cfg.training.mode} run has no task descriptions to inspect "
                       "against")
    dm = T2LDataModule(cfg.data, None, None, int(cfg.training.seed), recipe_file)
    dm._select_tasks()  # task selection only: no tokenizer, no instances encoded
    out = RunTasks()
    for tid in dm.train_task_ids:
        out.train[tid] = split_descriptions(dm.tasks[tid], int(cfg.data.holdout_descriptions), int(cfg.training.seed),
                                            int(cfg.data.max_descriptions_per_task))
    for tid in dm.eval_task_ids:
        task = dm.tasks[tid]
        out.unseen[tid] = list(task.eval_descriptions or task.descriptions)
    return out


def cache_root() -> Path:
    return cache_dir("inspect")


def _key(identity: str, tasks: RunTasks) -> str:
    payload = json.dumps({"v": INDEX_VERSION, "hypernet": identity,
                          "tasks": {t: [a, b] for t, (a, b) in tasks.train.items()}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@torch.inference_mode()
def build_index(generator, tasks: RunTasks, device=None) -> InspectIndex:
    """Embed every training and held-out description, and generate each task's centroid adapter."""
    from t2l_framework.encoders.cache import encode_sorted

    if not tasks.train:
        raise T2LError("the run has no training tasks to inspect against")
    task_ids = list(tasks.train)
    texts = [d for t in task_ids for d in tasks.train[t][0]]
    desc_task = torch.tensor([i for i, t in enumerate(task_ids) for _ in tasks.train[t][0]], dtype=torch.long)
    held = [d for t in task_ids for d in tasks.train[t][1]]
    if not held:
        raise T2LError("the run holds out no descriptions of its training tasks (data.holdout_descriptions = 0), "
                       "so familiarity has no reference")
    say(f"inspect: embedding {len(texts)} training and {len(held)} held-out descriptions (once per run) ...")
    raw = encode_sorted(generator.encoder, texts, device, progress=False)  # [N, d]
    emb = unit(raw)
    held_emb = unit(encode_sorted(generator.encoder, held, device, progress=False))
    heldout_similarity = (held_emb @ emb.T).max(dim=1).values  # [H]
    scale = raw.norm(dim=1).mean()
    centroids = torch.zeros(len(task_ids), emb.shape[1]).index_add_(0, desc_task, emb)
    task_embeddings = unit(centroids) * scale  # [T, d] at the encoder's own norm
    hyper = generator.hypernet
    modules = list(hyper.target_modules)
    norms = [layer_norms(hyper(task_embeddings[s:s + 32].to(hyper.layer_idx.device)), modules).cpu()
             for s in range(0, len(task_ids), 32)]
    return InspectIndex(task_ids, texts, desc_task, emb, heldout_similarity, task_embeddings,
                        torch.cat(norms), modules)


def load_or_build_index(generator, tasks: RunTasks, device=None) -> InspectIndex:
    """The cached index for this hypernetwork and these descriptions, built and stored once."""
    folder = cache_root() / _key(generator.identity, tasks)
    tensors_file, meta_file = folder / "index.safetensors", folder / "index.json"
    if tensors_file.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        t = load_file(str(tensors_file))
        return InspectIndex(meta["task_ids"], meta["descriptions"], t["desc_task"], t["embeddings"],
                            t["heldout_similarity"], t["task_embeddings"], t["task_norms"], meta["modules"])
    index = build_index(generator, tasks, device)
    with atomic_file(tensors_file, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in index.tensors().items()}, str(tmp))
    with atomic_file(meta_file) as tmp:  # written last: its presence means the pair is whole
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "task_ids": index.task_ids,
                                   "descriptions": index.descriptions, "modules": index.modules}))
    return index


def inspector_for(generator, recipe_file: Path | None) -> Inspector:
    """The ``Inspector`` of a loaded generator whose run has ``recipe_file`` (``recipe.yaml``)."""
    if recipe_file is None:
        raise T2LError(f"{generator.name}: a bare hypernet folder has no recipe.yaml, so its training tasks are "
                       "unknown; inspect the run folder instead")
    cfg = load_recipe(recipe_file, check_files=False)
    device = next(generator.hypernet.parameters()).device
    return Inspector(generator, load_or_build_index(generator, run_tasks(cfg, recipe_file), device))


def inspect_run(run: str | Path, descriptions: str | Sequence[str], revision: str | None = None, k: int = 5,
                json_file: str | Path | None = None, png_file: str | Path | None = None,
                device: str | torch.device | None = None, trust_remote_code: bool = False) -> list[dict]:
    """``t2l inspect`` in Python: one dict per description (see ``Inspector.inspect``); writes
    the JSON and the PNG when asked. ``run``: a run folder or a hub id (``revision`` for the latter)."""
    from t2l_framework.assembly.hub import resolve_run
    from t2l_framework.assembly.loading import default_device, load_adapter_generator
    from t2l_framework.run_folder import locate_hypernet

    descriptions = [descriptions] if isinstance(descriptions, str) else [d.strip() for d in descriptions]
    if not descriptions or not all(descriptions):
        raise T2LError("give one or more non-empty task descriptions to inspect")
    folder = resolve_run(run, revision)
    device = torch.device(device) if device else default_device()
    generator = load_adapter_generator(folder, device, trust_remote_code)
    inspector = inspector_for(generator, locate_hypernet(folder)[1])
    rows = inspector.inspect(descriptions, k)
    if json_file:
        with atomic_file(json_file) as tmp:
            tmp.write_text(json.dumps({"run": RunFolder(folder).name, "inspections": rows}, indent=1) + "\n")
    if png_file:
        from t2l_framework.runtime.inspect_plot import inspect_png

        inspect_png(rows, png_file, inspector.index.task_norms.median(dim=0).values.tolist())
    return rows
