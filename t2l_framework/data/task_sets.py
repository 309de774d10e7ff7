"""Named task sets a recipe can require (``data.task_set``), and where their tasks are read from.

``paper479`` is the list of SNI training tasks of the T2L paper (``train_ds_names`` of the
reference's ``configs/hyper_lora_decontam_lol_tasks.yaml``), shipped as
``data/sni/paper_train_tasks.txt``. The bundled data holds only some of them; ``t2l data
fetch`` downloads the rest into ``data.fetched_dir``, whose files are read together with
``data.tasks_file`` / ``data.instances_file``. A recipe that names a set refuses to train
until every task of it is there, instead of silently training on a fraction of the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from t2l_framework.config import TASK_SETS, resolve_path  # the schema's data.task_set choices
from t2l_framework.data.files import read_text, text_lines
from t2l_framework.errors import T2LError

__all__ = ["TASK_SETS", "task_set_ids", "fetched_pair", "task_sources", "task_ids_in", "missing_tasks",
           "check_task_set"]
FETCHED_TASKS, FETCHED_INSTANCES = "tasks.jsonl", "instances.jsonl"


def task_set_ids(name: str, recipe_file: Optional[Path] = None) -> list[str]:
    """The task ids of a named set, in file order ('#' starts a comment)."""
    if name not in TASK_SETS:
        raise T2LError(f"data.task_set: unknown set '{name}'; expected one of: {', '.join(TASK_SETS)}")
    path = resolve_path(TASK_SETS[name], recipe_file)
    if not path.is_file():
        raise T2LError(f"data.task_set '{name}': its task list {path} is missing")
    ids = [line.split("#", 1)[0].strip() for line in read_text(path).splitlines()]
    return [i for i in ids if i]


def fetched_pair(cfg, recipe_file: Optional[Path] = None) -> Optional[tuple[Path, Path]]:
    """(tasks file, instances file) that ``t2l data fetch`` wrote to ``data.fetched_dir``, if any."""
    if not cfg.fetched_dir:
        return None
    folder = resolve_path(cfg.fetched_dir, recipe_file)
    tasks, instances = folder / FETCHED_TASKS, folder / FETCHED_INSTANCES
    return (tasks, instances) if tasks.is_file() and instances.is_file() else None


def task_sources(cfg, recipe_file: Optional[Path] = None) -> list[tuple[Path, Path]]:
    """Every (tasks file, instances file) pair a ``DataConfig`` reads, the recipe's own first."""
    own = (resolve_path(cfg.tasks_file, recipe_file), resolve_path(cfg.instances_file, recipe_file))
    fetched = fetched_pair(cfg, recipe_file)
    return [own] + ([fetched] if fetched and fetched[0].resolve() != own[0].resolve() else [])


def task_ids_in(tasks_file: Path) -> set[str]:
    """Ids of the tasks a tasks file lists (records are not validated here; ``load_tasks`` does)."""
    ids = set()
    for _, line in text_lines(tasks_file):  # plain or .gz
        if line.strip():
            try:
                ids.add(json.loads(line).get("task"))
            except (json.JSONDecodeError, AttributeError):
                continue  # load_tasks reports the file and line
    return ids


def missing_tasks(cfg, recipe_file: Optional[Path] = None) -> tuple[list[str], list[str]]:
    """(the set's task ids, those not in any source) for ``data.task_set``; ([], []) without a set."""
    if not cfg.task_set:
        return [], []
    wanted = task_set_ids(cfg.task_set, recipe_file)
    present: set[str] = set()
    for tasks_file, _ in task_sources(cfg, recipe_file):
        if tasks_file.is_file():
            present |= task_ids_in(tasks_file)
    return wanted, [t for t in wanted if t not in present]


def check_task_set(cfg, recipe_file: Optional[Path] = None) -> None:
    """Refuse a recipe whose ``data.task_set`` is not all there, saying how to get it."""
    wanted, missing = missing_tasks(cfg, recipe_file)
    if missing:
        where = " + ".join(str(t) for t, _ in task_sources(cfg, recipe_file))
        raise T2LError(
            f"data.task_set '{cfg.task_set}': {len(missing)} of {len(wanted)} tasks missing from {where} "
            f"(e.g. {', '.join(missing[:3])}); run `t2l data fetch` to download them (it resumes; "
            "rerun it until nothing is missing)"
        )
