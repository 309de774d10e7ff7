"""Tasks, their descriptions and their instances, read from two JSONL files.

File formats (the bundled ``data/sni/`` files follow them; so can your own tasks):

``tasks_file`` has one JSON object per line, one per task::

    {"task": "my_sentiment", "descriptions": ["Decide if a review is positive or negative.", ...],
     "eval_descriptions": [], "definition": "...", "role": "train"}

- ``task`` (str, required): the task id used everywhere else.
- ``descriptions`` (list of str, required, non-empty): plain-language descriptions of the task;
  the hypernetwork is trained on these.
- ``eval_descriptions`` (list of str, optional): descriptions never used in training, kept for
  evaluation. Without them, ``DataConfig.holdout_descriptions`` descriptions are held back.
- ``role`` (str, optional, default "train"): "train", "train+eval_seen" or "eval_unseen"; decides
  which tasks are used when the recipe names none.
- ``definition`` (str, optional): the original task instruction (kept for reference).
- Other fields are ignored.

``instances_file`` has one JSON object per line, one per example::

    {"task": "my_sentiment", "split": "train", "input": "Great phone!", "output": ["positive"]}

- ``split``: "train" (used for training) or "test" (held out for validation and evaluation).
- ``output``: a list of acceptable answers (a single string is accepted too); the first one is
  the training target, all of them count as correct in evaluation.

Every problem is a ``T2LError`` naming the file and line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from t2l_framework.config import resolve_path
from t2l_framework.data.files import read_text, text_lines
from t2l_framework.errors import T2LError, did_you_mean

# The 10 tasks T2L removed from training because they overlap its benchmarks
# (SakanaAI/text-to-lora configs/hyper_lora_decontam_lol_tasks.yaml). Always excluded, so that
# a user-supplied copy of the full SNI collection cannot reintroduce the leak by accident.
T2L_DECONTAM_EXCLUDED = frozenset(
    ["lol_033", "lol_034", "lol_080", "lol_081", "lol_228", "lol_380", "lol_381", "lol_1286", "lol_1389", "lol_1391"]
)

INSTANCE_FIELDS = ("task", "split", "input", "output")


@dataclass
class Instance:
    """One example: the user turn and the acceptable answers (``outputs[0]`` is the target)."""

    input: str
    outputs: list[str]


@dataclass
class Task:
    """A task with its descriptions and instances."""

    task_id: str
    definition: str
    descriptions: list[str]
    eval_descriptions: list[str] = field(default_factory=list)
    role: str = "train"
    train: list[Instance] = field(default_factory=list)
    test: list[Instance] = field(default_factory=list)


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line, streaming."""
    for lineno, line in text_lines(path):  # plain or .gz
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise T2LError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise T2LError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _str_list(value, path: Path, lineno: int, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise T2LError(f"{path}:{lineno}: field '{key}' must be a list of strings")
    return value


def expand_task_ids(ids: Iterable[str], recipe_file: Optional[Path] = None) -> list[str]:
    """Task ids, where an entry '@file.txt' stands for the ids listed in that file.

    The file has one id per line; '#' starts a comment. Relative paths are resolved like every
    recipe path (``config.resolve_path``), e.g. ``@data/sni/decontam_exclude.txt``.
    """
    out: list[str] = []
    for item in ids:
        item = str(item)
        if not item.startswith("@"):
            out.append(item)
            continue
        path = resolve_path(item[1:], recipe_file)
        if not path.exists():
            raise T2LError(f"task list '{item}': file {path} not found")
        for line in read_text(path).splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def load_tasks(
    tasks_file: str | Path,
    instances_file: str | Path,
    include: Optional[list[str]] = None,
    exclude: Iterable[str] = (),
    extra: Iterable[tuple[str | Path, str | Path]] = (),
) -> dict[str, Task]:
    """Read tasks and their instances; ``include=None`` means every task not excluded.

    ``exclude`` is added to T2L's decontamination list. Naming an excluded or unknown task in
    ``include`` is an error, as is a selected task without descriptions or instances.
    ``extra``: more (tasks file, instances file) pairs, e.g. what ``t2l data fetch`` wrote;
    a task already read from an earlier pair keeps that pair's record and instances.
    """
    excluded = set(exclude) | T2L_DECONTAM_EXCLUDED
    if include is not None:
        clash = sorted(set(include) & excluded)
        if clash:
            raise T2LError(f"tasks {clash} are both requested and excluded (exclude_tasks or T2L's decontamination list)")
    tasks: dict[str, Task] = {}
    known: set[str] = set()
    sources = [(Path(tasks_file), Path(instances_file))] + [(Path(t), Path(i)) for t, i in extra]
    for t_file, i_file in sources:
        _load_pair(t_file, i_file, include, excluded, tasks, known)
    for task_id in include or []:
        if task_id not in known:
            where = " or ".join(str(t) for t, _ in sources)
            raise T2LError(f"task '{task_id}' is not in {where}{did_you_mean(task_id, known)}")
    return tasks


def _load_pair(tasks_file: Path, instances_file: Path, include: Optional[list[str]], excluded: set[str],
               tasks: dict[str, Task], known: set[str]) -> None:
    """Add one (tasks file, instances file) pair's tasks to ``tasks`` (ids seen before are skipped)."""
    earlier = set(known)
    here: set[str] = set()
    mine: dict[str, Task] = {}
    for lineno, rec in _json_lines(tasks_file):
        task_id = rec.get("task")
        if not isinstance(task_id, str):
            raise T2LError(f"{tasks_file}:{lineno}: missing field 'task' (each line needs task and descriptions)")
        if task_id in here:
            raise T2LError(f"{tasks_file}:{lineno}: task '{task_id}' appears a second time")
        here.add(task_id)
        known.add(task_id)
        if task_id in earlier or task_id in excluded or (include is not None and task_id not in include):
            continue
        if "descriptions" not in rec:
            raise T2LError(f"{tasks_file}:{lineno}: missing field 'descriptions' (each line needs task and descriptions)")
        descriptions = _str_list(rec["descriptions"], tasks_file, lineno, "descriptions")
        if not descriptions:
            raise T2LError(f"{tasks_file}:{lineno}: task '{task_id}' has no descriptions (need at least one)")
        mine[task_id] = Task(
            task_id=task_id,
            definition=str(rec.get("definition") or ""),
            descriptions=descriptions,
            eval_descriptions=_str_list(rec.get("eval_descriptions") or [], tasks_file, lineno, "eval_descriptions"),
            role=str(rec.get("role") or "train"),
        )

    for lineno, rec in _json_lines(instances_file):
        for key in INSTANCE_FIELDS:
            if key not in rec:
                raise T2LError(
                    f"{instances_file}:{lineno}: missing field '{key}' (each line needs {', '.join(INSTANCE_FIELDS)})"
                )
        task = mine.get(rec["task"])
        if task is None:
            if rec["task"] not in here and rec["task"] not in excluded:
                raise T2LError(f"{instances_file}:{lineno}: task '{rec['task']}' is not in {tasks_file}")
            continue
        outputs = _str_list(rec["output"], instances_file, lineno, "output")
        if not outputs or not isinstance(rec["input"], str):
            raise T2LError(f"{instances_file}:{lineno}: 'input' must be a string and 'output' a non-empty list")
        if rec["split"] not in ("train", "test"):
            raise T2LError(f"{instances_file}:{lineno}: split '{rec['split']}' must be 'train' or 'test'")
        getattr(task, rec["split"]).append(Instance(rec["input"], outputs))

    for task in mine.values():
        if not task.train and not task.test:
            raise T2LError(f"task '{task.task_id}' has no instances in {instances_file}")
    tasks.update(mine)


def split_descriptions(task: Task, n_holdout: int, seed: int, max_descriptions: int = 0) -> tuple[list[str], list[str]]:
    """(training descriptions, held-out descriptions) of a task.

    max_descriptions > 0 keeps only the task's first that many descriptions (the reference's
    ``n_descs_per_ds``); ``eval_descriptions`` are never cut. A task with
    ``eval_descriptions`` keeps them as its held-out set. Otherwise ``n_holdout``
    descriptions are drawn (the same ones for the same seed) and removed from training; at
    least one stays for training, so a one-description task has no held-out description.
    """
    if max_descriptions < 0:
        raise T2LError(f"data.max_descriptions_per_task: expected 0 (all) or a positive integer, got {max_descriptions}")
    descriptions = task.descriptions[:max_descriptions] if max_descriptions > 0 else task.descriptions
    if task.eval_descriptions:
        held = set(task.eval_descriptions)
        return [d for d in descriptions if d not in held], list(task.eval_descriptions)
    unique = list(dict.fromkeys(descriptions))
    n = max(0, min(n_holdout, len(unique) - 1))
    order = list(range(len(unique)))
    # Seeded by task id too, so adding a task does not change another task's held-out set.
    random.Random(f"{seed}-{task.task_id}").shuffle(order)
    held_idx = set(order[:n])
    return [d for i, d in enumerate(unique) if i not in held_idx], [unique[i] for i in sorted(held_idx)]
