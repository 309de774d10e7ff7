"""Training-task sets of N tasks by the rule written in ``data/demo_tasks.yaml`` (``task_set_rule``).

The scaling map (``benchmarks/scaling_map.py``) trains on 10, 30 and all eligible tasks against
the same unseen set; the sets must be chosen by a rule, not by hand per run, and nest: the demo's
30 tasks are the first 30 of the order, so a larger set only adds tasks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import yaml

from t2l_framework.config import resolve_path
from t2l_framework.data.files import read_text, text_lines
from t2l_framework.data.tasks import expand_task_ids
from t2l_framework.errors import T2LError

DEMO_TASKS = "data/demo_tasks.yaml"
BUNDLED_TASKS = "data/sni/tasks.jsonl.gz"


def _load(demo_file: Path) -> dict:
    if not demo_file.is_file():
        raise T2LError(f"task-set rule: {demo_file} not found")
    data = yaml.safe_load(read_text(demo_file)) or {}
    for key in ("train_tasks", "eval_tasks", "task_set_rule"):
        if key not in data:
            raise T2LError(f"{demo_file}: key '{key}' is missing")
    for key in ("pool_roles", "exclude", "capped_name"):
        if key not in data["task_set_rule"]:
            raise T2LError(f"{demo_file}: key 'task_set_rule.{key}' is missing")
    return data


def eligible_pool(demo_file: Optional[Path] = None, tasks_file: Optional[Path] = None) -> list[str]:
    """Every task the rule may train on, sorted by id (76 with the shipped bundle)."""
    demo_file = demo_file or resolve_path(DEMO_TASKS)
    tasks_file = tasks_file or resolve_path(BUNDLED_TASKS)
    data = _load(demo_file)
    rule = data["task_set_rule"]
    excluded = set(expand_task_ids(rule["exclude"], demo_file)) | set(data["eval_tasks"])
    demo = set(data["train_tasks"])
    pool = set()
    for _, line in text_lines(tasks_file):
        if not line.strip():
            continue
        rec = json.loads(line)
        tid, name = str(rec.get("task")), str(rec.get("sni_name", ""))
        if rec.get("role") not in rule["pool_roles"] or tid in excluded:
            continue
        if rule["capped_name"] in name and tid not in demo:
            continue
        pool.add(tid)
    missing = sorted(demo - pool)
    if missing:
        raise T2LError(f"{demo_file}: train_tasks {missing} are not in the eligible pool of {tasks_file}")
    return sorted(pool)


def _order_key(task: str) -> str:
    return hashlib.sha256(f"demo-task-order:{task}".encode()).hexdigest()


def training_task_set(n: int | str, demo_file: Optional[Path] = None, tasks_file: Optional[Path] = None) -> list[str]:
    """The N training tasks of the rule (``n`` an int or "all"), in a fixed order."""
    demo_file = demo_file or resolve_path(DEMO_TASKS)
    pool = eligible_pool(demo_file, tasks_file)
    demo = list(_load(demo_file)["train_tasks"])
    if n == "all":
        n = len(pool)
    if not isinstance(n, int) or not 1 <= n <= len(pool):
        raise T2LError(f"task-set size must be 'all' or 1..{len(pool)} (the eligible pool), not {n!r}")
    if n <= len(demo):
        return [demo[i * len(demo) // n] for i in range(n)]
    rest = sorted((t for t in pool if t not in demo), key=_order_key)
    return demo + rest[:n - len(demo)]
