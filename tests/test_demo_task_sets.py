"""The rule for training-task sets of N tasks (data/demo_tasks.yaml task_set_rule)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from t2l_framework.data.demo_task_sets import eligible_pool, training_task_set
from t2l_framework.data.files import text_lines
from t2l_framework.data.tasks import expand_task_ids
from t2l_framework.errors import T2LError

ROOT = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((ROOT / "data" / "demo_tasks.yaml").read_text())


def _records() -> dict[str, dict]:
    return {r["task"]: r for r in (json.loads(line) for _, line in text_lines(ROOT / "data/sni/tasks.jsonl.gz")
                                   if line.strip())}


def test_the_pool_is_every_trainable_bundled_task_but_unseen_decontaminated_and_extra_mmlu():
    records, pool = _records(), eligible_pool()
    excluded = set(expand_task_ids(["@data/sni/decontam_exclude.txt"]))
    assert len(pool) == 76 and pool == sorted(pool)
    assert not set(pool) & (excluded | set(DEMO["eval_tasks"]))
    assert all("train" in records[t]["role"] for t in pool)
    mmlu = [t for t in pool if "mmmlu" in records[t]["sni_name"]]
    assert len(mmlu) == 6 and set(mmlu) <= set(DEMO["train_tasks"])
    # nothing trainable is left out but for those reasons
    left_out = [t for t, r in records.items() if r["role"] in ("train", "train+eval_seen") and t not in pool]
    assert all(t in excluded or t in DEMO["eval_tasks"] or "mmmlu" in records[t]["sni_name"] for t in left_out)


def test_sets_of_10_30_and_all_are_deterministic_and_nest():
    ten, thirty, every = training_task_set(10), training_task_set(30), training_task_set("all")
    assert thirty == DEMO["train_tasks"]  # the demo's own set
    assert ten == [DEMO["train_tasks"][i] for i in range(0, 30, 3)]  # evenly spaced: every answer format
    assert len(every) == 76 and sorted(every) == eligible_pool() and every[:30] == thirty
    assert training_task_set(40) == every[:40] and training_task_set(40) == training_task_set(40)
    with pytest.raises(T2LError, match="1..76"):
        training_task_set(77)
