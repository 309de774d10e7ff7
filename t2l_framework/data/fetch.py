"""`t2l data fetch`: download the SNI training tasks the bundle lacks, as the T2L reference does.

The reference trains on 479 Super-NaturalInstructions tasks, reading each one from the
Hugging Face hub as the dataset ``Lots-of-LoRAs/<SNI task name>`` (config ``default``,
split ``train[:10000]``) and its task descriptions from ``tasks/<task>/metadata.yaml`` of its
repository. This module does the same for every task of a ``data.task_set`` that is neither
in the bundled ``tasks_file`` nor fetched before, and writes them in the bundle's JSONL format
(``data/README.md``) to ``OUT/tasks.jsonl`` + ``OUT/instances.jsonl``:

- each task lands in ``OUT/parts/<task>/`` through an atomic directory rename, so an
  interrupted run leaves only whole tasks behind and the next run skips them (resume);
- a failed download is retried with exponential backoff (the hub rejects some of ~500 quick
  downloads, the reference's README warns); what still fails is listed at the end, the merged
  files hold everything fetched so far, and the command exits non-zero until nothing is missing.

A Lots-of-LoRAs row holds the full SNI prompt (``Definition: ... Now complete the following
example - Input: ... Output:``); the instance ``input`` is its last ``Input:`` (the task reaches
the model through its description), parsed the way the reference's ``get_preprocessing_fn``
does. Splits: ``train`` = the hub's train split (first ``max_train``), ``test`` = the hub's test
split (first ``max_test``), so numbers are not the bundle's own 10%/300 split.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

import yaml

from t2l_framework.atomic import atomic_file, atomic_folder
from t2l_framework.config import project_root
from t2l_framework.data.files import read_text
from t2l_framework.data.task_sets import FETCHED_INSTANCES, FETCHED_TASKS, task_ids_in, task_set_ids
from t2l_framework.errors import T2LError

HUB_ORG = "Lots-of-LoRAs"
REFERENCE_REPO = "SakanaAI/text-to-lora"
REFERENCE_COMMIT = "8ba77493eb8c732bac41c22ca76117dcacfcf2a4"
DESCRIPTIONS_URL = f"https://raw.githubusercontent.com/{REFERENCE_REPO}/{REFERENCE_COMMIT}/tasks/{{task}}/metadata.yaml"
REFERENCE_CONFIG = "data/t2l/configs/hyper_lora_decontam_lol_tasks.yaml"  # the reference's, verbatim
TASK_INDEX = "data/sni/task_index.csv"


class TaskFormatError(T2LError):
    """A downloaded task that cannot be converted; retrying would not help."""


class TaskSource(Protocol):
    """Where a task's rows and descriptions come from (the hub, or a local stand-in in tests)."""

    def rows(self, sni_name: str, split: str, limit: int) -> list[dict]:
        """The first ``limit`` rows (dicts with ``input``, ``output``, ``id``) of a split."""
        ...

    def descriptions(self, task: str) -> list[str]:
        """The T2L task descriptions of ``task`` (lol_NNN)."""
        ...


@dataclass
class HubSource:
    """Rows through ``datasets.load_dataset`` and descriptions from the reference's repository.

    hub_root: where the ``<sni_name>`` datasets live: the hub organisation (default), or a local
    folder with one dataset folder per task. descriptions_root: a local checkout of the
    reference repository (``tasks/<task>/metadata.yaml``) instead of downloading the file.
    """

    hub_root: str = HUB_ORG
    descriptions_root: Optional[Path] = None
    cache_dir: Optional[str] = None
    timeout_s: float = 60.0

    def rows(self, sni_name: str, split: str, limit: int) -> list[dict]:
        try:
            import datasets
        except ImportError:
            raise T2LError("`t2l data fetch` needs the datasets package; run `pip install datasets`") from None
        ds = datasets.load_dataset(f"{self.hub_root}/{sni_name}", name="default", split=f"{split}[:{limit}]",
                                   cache_dir=self.cache_dir)
        return [dict(row) for row in ds]

    def descriptions(self, task: str) -> list[str]:
        if self.descriptions_root is not None:
            text = read_text(Path(self.descriptions_root) / "tasks" / task / "metadata.yaml")
        else:
            with urllib.request.urlopen(DESCRIPTIONS_URL.format(task=task), timeout=self.timeout_s) as response:
                text = response.read().decode("utf-8")
        meta = yaml.safe_load(text)  # plain data only: nothing in the file can run code
        descriptions = meta.get("descriptions") if isinstance(meta, dict) else None
        if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions) or not descriptions:
            raise TaskFormatError(f"{task}: metadata.yaml has no list of descriptions")
        return descriptions


def parse_sni_prompt(text: str) -> tuple[str, str]:
    """(definition, instance input) from a Lots-of-LoRAs ``input``, as the reference's preprocessing."""
    try:
        definition = text.split("Definition: ", 1)[1].split("\n\nPositive Example")[0]
        problem = text.split("Now complete the following example -")[1].split("Input: ", 1)[1].split("\nOutput:")[0]
    except IndexError:
        raise TaskFormatError(f"row input is not an SNI prompt ('Definition: ... Now complete the following "
                              f"example - Input: ... Output:'): {text[:80]!r}") from None
    return definition, problem


@dataclass
class Plan:
    """Which tasks a fetch is about: the set's ids, their SNI names and T2L roles."""

    wanted: list[str]
    sni_names: dict[str, str]
    roles: dict[str, str]
    eval_descriptions: dict[str, list[str]]


def make_plan(task_set: str) -> Plan:
    """Ids of ``task_set`` with their SNI names (``data/sni/task_index.csv``) and, from the
    reference's config, whether each is also a seen-task evaluation (and its 3 held-out
    descriptions)."""
    wanted = task_set_ids(task_set)
    names = {row["task"]: row["sni_name"] for row in csv.DictReader(read_text(project_root() / TASK_INDEX).splitlines())}
    config = yaml.safe_load(read_text(project_root() / REFERENCE_CONFIG))
    eval_info = config.get("eval_ds_info") or {}
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise T2LError(f"{TASK_INDEX}: no SNI name for tasks {unknown[:5]}")
    evals = {t: list(eval_info[t]["descriptions"]) for t in wanted if t in eval_info}
    roles = {t: "train+eval_seen" if t in evals else "train" for t in wanted}
    return Plan(wanted, {t: names[t] for t in wanted}, roles, evals)


def convert_task(task: str, plan: Plan, source: TaskSource, max_train: int, max_test: int) -> tuple[dict, list[dict]]:
    """(task record, instance records) of one task in the bundle's JSONL format."""
    name = plan.sni_names[task]
    splits = {split: source.rows(name, split, limit) for split, limit in (("train", max_train), ("test", max_test))}
    if not splits["train"]:
        raise TaskFormatError(f"{HUB_ORG}/{name} has no train rows")
    instances, definition = [], ""
    for split, rows in splits.items():
        for row in rows:
            definition, problem = parse_sni_prompt(str(row.get("input", "")))
            outputs = row.get("output")
            outputs = [outputs] if isinstance(outputs, str) else list(outputs or [])
            if not outputs or not all(isinstance(o, str) for o in outputs):
                raise TaskFormatError(f"{HUB_ORG}/{name}: row {row.get('id')!r} has no list of string outputs")
            instances.append({"task": task, "split": split, "id": row.get("id"), "input": problem, "output": outputs})
    record = {
        "task": task, "sni_name": name, "role": plan.roles[task], "kind": "lots_of_loras", "definition": definition,
        "descriptions": source.descriptions(task), "eval_descriptions": plan.eval_descriptions.get(task, []),
        "n_train": len(splits["train"]), "n_test": len(splits["test"]),
        "source": f"hf:{HUB_ORG}/{name} (train[:{max_train}], test[:{max_test}]); descriptions: "
                  f"{REFERENCE_REPO}@{REFERENCE_COMMIT}:tasks/{task}/metadata.yaml",
    }
    return record, instances


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def save_part(out: Path, record: dict, instances: list[dict]) -> Path:
    """Write ``out/parts/<task>/`` as a whole or not at all (rename of a finished temp folder)."""
    final = out / "parts" / record["task"]
    with atomic_folder(final) as tmp:
        _write_jsonl(tmp / FETCHED_TASKS, [record])
        _write_jsonl(tmp / FETCHED_INSTANCES, instances)
    return final


def fetched_parts(out: Path) -> set[str]:
    """Tasks already fetched into ``out`` (complete part folders only; temp folders start with '.')."""
    parts = out / "parts"
    if not parts.is_dir():
        return set()
    return {p.name for p in parts.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (p / FETCHED_TASKS).is_file() and (p / FETCHED_INSTANCES).is_file()}


def merge_parts(out: Path, order: list[str]) -> int:
    """Rebuild ``out/tasks.jsonl`` and ``out/instances.jsonl`` from the parts (set order); each file
    is replaced atomically. Returns the number of tasks merged."""
    have = fetched_parts(out)
    tasks = [t for t in order if t in have]
    for name in (FETCHED_INSTANCES, FETCHED_TASKS):  # instances first: tasks.jsonl is what readers look for
        with atomic_file(out / name) as tmp, open(tmp, "w", encoding="utf-8") as dst:
            for t in tasks:
                with open(out / "parts" / t / name, encoding="utf-8") as src:
                    shutil.copyfileobj(src, dst)
    return len(tasks)


@dataclass
class FetchReport:
    """What a fetch did: counts, and the tasks still missing with their last error."""

    wanted: int
    bundled: int
    earlier: int
    fetched: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # tried in this run: task -> last error
    not_tried: list[str] = field(default_factory=list)    # missing and not tried (--only, or given up)

    @property
    def missing(self) -> int:
        return len(self.failed) + len(self.not_tried)


def fetch_tasks(task_set: str, out: Path, bundled_tasks_file: Path, source: Optional[TaskSource] = None,
                retries: int = 5, backoff_s: float = 2.0, max_train: int = 10000, max_test: int = 100,
                only: Optional[list[str]] = None, give_up_after: int = 3, say: Callable[[str], None] = print,
                sleep: Callable[[float], None] = time.sleep) -> FetchReport:
    """Download every task of ``task_set`` that is neither in ``bundled_tasks_file`` nor in ``out``.

    A task is tried ``1 + retries`` times, waiting ``backoff_s * 2**k`` seconds after the k-th
    failure; a ``TaskFormatError`` is not retried. After ``give_up_after`` tasks in a row
    failed, the run stops (an unreachable hub would otherwise cost every task its full
    backoff). ``only`` restricts the run to those ids.
    """
    if retries < 0 or backoff_s < 0 or max_train <= 0 or max_test < 0 or give_up_after <= 0:
        raise T2LError("data fetch: --retries and --backoff must be >= 0, --max-train and --give-up-after > 0 "
                       "and --max-test >= 0")
    plan = make_plan(task_set)
    source = source or HubSource()
    bundled = task_ids_in(bundled_tasks_file) if bundled_tasks_file.is_file() else set()
    out.mkdir(parents=True, exist_ok=True)
    earlier = fetched_parts(out)
    todo = [t for t in plan.wanted if t not in bundled and t not in earlier]
    if only:
        unknown = sorted(set(only) - set(plan.wanted))
        if unknown:
            raise T2LError(f"data fetch --only: {unknown[:5]} are not in the task set '{task_set}'")
        todo = [t for t in todo if t in set(only)]
    report = FetchReport(len(plan.wanted), len(bundled & set(plan.wanted)), len(earlier & set(plan.wanted)))
    say(f"{task_set}: {len(plan.wanted)} tasks; {report.bundled} bundled, {report.earlier} fetched before, "
        f"{len(todo)} to download into {out}")
    in_a_row = 0
    try:
        for i, task in enumerate(todo, 1):
            if in_a_row >= give_up_after:
                say(f"{in_a_row} tasks in a row failed; stopping here (is the hub reachable?)")
                break
            done = False
            for attempt in range(retries + 1):
                try:
                    record, instances = convert_task(task, plan, source, max_train, max_test)
                except TaskFormatError as exc:
                    report.failed[task] = str(exc)
                    break
                except Exception as exc:  # noqa: BLE001 - network, hub and datasets errors all get retried
                    report.failed[task] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if attempt < retries:
                        wait = backoff_s * 2 ** attempt
                        say(f"  {task}: {report.failed[task]}; retrying in {wait:g} s ({attempt + 1}/{retries})")
                        sleep(wait)
                    continue
                save_part(out, record, instances)
                done = True
                report.failed.pop(task, None)
                report.fetched.append(task)
                say(f"  [{i}/{len(todo)}] {task} ({plan.sni_names[task]}): {record['n_train']} train, "
                    f"{record['n_test']} test, {len(record['descriptions'])} descriptions")
                break
            in_a_row = 0 if done else in_a_row + 1
    finally:  # also on Ctrl-C: what was fetched is usable and the next run resumes after it
        merged = merge_parts(out, plan.wanted)
        say(f"{out / FETCHED_TASKS}: {merged} fetched tasks")
    have = fetched_parts(out)
    report.not_tried = [t for t in plan.wanted if t not in bundled and t not in have and t not in report.failed]
    return report


def summary(report: FetchReport, task_set: str) -> str:
    """The closing lines: what is there, what failed and why, and what to do next."""
    have = report.wanted - report.missing
    lines = [f"{task_set}: {have} of {report.wanted} tasks present ({report.bundled} bundled, "
             f"{report.earlier + len(report.fetched)} fetched; {len(report.fetched)} in this run)"]
    if report.missing:
        lines += [f"  failed {t}: {why}" for t, why in sorted(report.failed.items())]
        if report.not_tried:
            lines.append(f"  not tried in this run: {len(report.not_tried)} ({', '.join(report.not_tried[:5])}"
                         f"{', ...' if len(report.not_tried) > 5 else ''})")
        lines.append(f"{report.missing} of {report.wanted} tasks still missing; run `t2l data fetch` again "
                     "(it keeps what it has and resumes)")
    return "\n".join(lines)
