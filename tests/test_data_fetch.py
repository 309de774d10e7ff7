"""`t2l data fetch` against local stand-ins for the hub (never the network), task sets, resume.

The stand-in hub is a folder of dataset folders read through the real ``datasets`` library
(``--hub DIR``); descriptions come from a fake reference checkout (``--descriptions-from``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from t2l_framework import config
from t2l_framework.cli import main
from t2l_framework.assembly import load_recipe
from t2l_framework.config import DataConfig, project_root
from t2l_framework.data import load_tasks
from t2l_framework.data import task_sets
from t2l_framework.data.fetch import HubSource, fetch_tasks, fetched_parts, summary
from t2l_framework.data.task_sets import check_task_set, task_set_ids
from t2l_framework.errors import T2LError

BUNDLED = project_root() / "data" / "sni" / "tasks.jsonl.gz"
BUNDLED_INSTANCES = project_root() / "data" / "sni" / "instances.jsonl.gz"
# Paper training tasks: two the bundle lacks (lol_084 is also a seen-task evaluation), one it has.
MISSING = {"lol_022": "task022_cosmosqa_passage_inappropriate_binary",
           "lol_084": "task084_babi_t1_single_supporting_fact_identify_relevant_fact"}
SET = ["lol_022", "lol_084", "lol_067"]


def sni_prompt(definition: str, problem: str) -> str:
    return (f"Definition: {definition}\n\nPositive Example 1 -\nInput: an example\nOutput: its answer\n\n"
            f"Now complete the following example -\nInput: {problem}\nOutput:")


@pytest.fixture
def tiny_set(tmp_path, monkeypatch):
    """A 3-task set, a local hub with the 2 missing tasks, a fake reference checkout."""
    ids = tmp_path / "tiny_set.txt"
    ids.write_text("# three paper tasks\n" + "\n".join(SET) + "\n")
    monkeypatch.setitem(task_sets.TASK_SETS, "tiny", str(ids))
    monkeypatch.setitem(config.CHOICES, "data.task_set", (*config.CHOICES["data.task_set"], "tiny"))  # a recipe may name it
    hub, ref = tmp_path / "hub", tmp_path / "reference"
    for task, name in MISSING.items():
        folder = hub / name
        folder.mkdir(parents=True)
        for split, n in (("train", 6), ("valid", 2), ("test", 3)):
            rows = [{"id": f"{task}-{split}-{i}", "input": sni_prompt(f"Do {task}.", f"{split} question {i}"),
                     "output": [f"answer {i}", "alt"]} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta = ref / "tasks" / task / "metadata.yaml"
        meta.parent.mkdir(parents=True)
        meta.write_text(yaml.safe_dump({"descriptions": [f"{task} description {k}" for k in range(5)]}))
    return {"hub": hub, "ref": ref, "out": tmp_path / "sni_hub", "cache": tmp_path / "cache"}


def test_paper_task_list_is_the_references_train_list():
    config = yaml.safe_load((project_root() / "data/t2l/configs/hyper_lora_decontam_lol_tasks.yaml").read_text())
    ids = task_set_ids("paper479")
    assert ids == config["train_ds_names"] and len(set(ids)) == 479
    assert not set(ids) & {"lol_033", "lol_034", "lol_080", "lol_081", "lol_228"}  # decontaminated


def test_fetch_through_datasets_from_a_local_hub(tiny_set, capsys):
    out = tiny_set["out"]
    rc = main(["data", "fetch", "--set", "tiny", "-o", str(out), "--hub", str(tiny_set["hub"]),
               "--descriptions-from", str(tiny_set["ref"]), "--cache-dir", str(tiny_set["cache"]),
               "--max-train", "4"])
    assert rc == 0
    assert "tiny: 3 of 3 tasks present (1 bundled, 2 fetched; 2 in this run)" in capsys.readouterr().out
    records = {r["task"]: r for r in map(json.loads, (out / "tasks.jsonl").read_text().splitlines())}
    assert list(records) == ["lol_022", "lol_084"]  # set order; the bundled task is not downloaded
    seen = records["lol_084"]
    assert seen["sni_name"] == MISSING["lol_084"] and seen["definition"] == "Do lol_084."
    assert seen["descriptions"] == [f"lol_084 description {k}" for k in range(5)]
    assert seen["role"] == "train+eval_seen" and len(seen["eval_descriptions"]) == 3  # from the reference config
    assert records["lol_022"]["role"] == "train" and records["lol_022"]["eval_descriptions"] == []
    rows = [json.loads(line) for line in (out / "instances.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["task"] == "lol_022")
    assert first == {"task": "lol_022", "split": "train", "id": "lol_022-train-0", "input": "train question 0",
                     "output": ["answer 0", "alt"]}
    tasks = load_tasks(BUNDLED, BUNDLED_INSTANCES, include=SET, extra=[(out / "tasks.jsonl", out / "instances.jsonl")])
    assert [len(tasks["lol_022"].train), len(tasks["lol_022"].test)] == [4, 3]  # --max-train 4, hub test split
    assert len(tasks["lol_067"].train) > 0  # still read from the bundle


class MemorySource:
    """An in-memory hub: rows per SNI name; fails the first ``fail[name]`` calls for a name."""

    def __init__(self, fail=None, interrupt_on=None, bad=()):
        self.fail, self.interrupt_on, self.bad = dict(fail or {}), interrupt_on, set(bad)
        self.calls: list[str] = []

    def rows(self, sni_name, split, limit):
        self.calls.append(sni_name)
        if sni_name == self.interrupt_on:
            raise KeyboardInterrupt
        if self.fail.get(sni_name, 0) > 0:
            self.fail[sni_name] -= 1
            raise ConnectionError("503 Service Unavailable")
        text = "no prompt here" if sni_name in self.bad else sni_prompt("Define.", f"{split} q")
        return [{"id": f"{sni_name}-{split}-{i}", "input": text, "output": ["a"]} for i in range(min(limit, 2))]

    def descriptions(self, task):
        return [f"{task} says hello"]


def test_retries_back_off_exponentially_then_succeed(tiny_set):
    source, waits = MemorySource(fail={MISSING["lol_022"]: 2}), []
    report = fetch_tasks("tiny", tiny_set["out"], BUNDLED, source=source, retries=3, backoff_s=0.5,
                         say=lambda m: None, sleep=waits.append)
    assert waits == [0.5, 1.0] and report.missing == 0 and sorted(report.fetched) == sorted(MISSING)


def test_still_failing_task_is_reported_and_a_rerun_resumes(tiny_set, capsys):
    out = tiny_set["out"]
    flaky = MemorySource(fail={MISSING["lol_084"]: 10})
    report = fetch_tasks("tiny", out, BUNDLED, source=flaky, retries=2, backoff_s=1, say=lambda m: None,
                         sleep=lambda s: None)
    assert report.fetched == ["lol_022"] and list(report.failed) == ["lol_084"]
    assert flaky.calls.count(MISSING["lol_084"]) == 3  # 1 + 2 retries
    text = summary(report, "tiny")
    assert "failed lol_084: ConnectionError: 503 Service Unavailable" in text
    assert "1 of 3 tasks still missing; run `t2l data fetch` again" in text
    # What was fetched is usable already, and the set check names what is missing.
    cfg = DataConfig(task_set="tiny", fetched_dir=str(out))
    with pytest.raises(T2LError, match=r"data.task_set 'tiny': 1 of 3 tasks missing .* \(e.g. lol_084\); "
                                       r"run `t2l data fetch`"):
        check_task_set(cfg)
    good = MemorySource()
    again = fetch_tasks("tiny", out, BUNDLED, source=good, say=lambda m: None, sleep=lambda s: None)
    assert good.calls == [MISSING["lol_084"]] * 2 and again.fetched == ["lol_084"] and again.missing == 0
    check_task_set(cfg)  # complete now
    assert [json.loads(line)["task"] for line in (out / "tasks.jsonl").read_text().splitlines()] == ["lol_022", "lol_084"]


def test_interrupted_fetch_keeps_whole_tasks_and_resumes(tiny_set):
    out = tiny_set["out"]
    with pytest.raises(KeyboardInterrupt):
        fetch_tasks("tiny", out, BUNDLED, source=MemorySource(interrupt_on=MISSING["lol_084"]), say=lambda m: None)
    assert fetched_parts(out) == {"lol_022"}
    assert not [p for p in (out / "parts").iterdir() if p.name.startswith(".")]  # no half-written task
    assert [json.loads(line)["task"] for line in (out / "tasks.jsonl").read_text().splitlines()] == ["lol_022"]
    source = MemorySource()
    fetch_tasks("tiny", out, BUNDLED, source=source, say=lambda m: None)
    assert source.calls == [MISSING["lol_084"]] * 2  # train and test of the one task left


def test_gives_up_when_tasks_keep_failing(tiny_set):
    source = MemorySource(fail={name: 99 for name in MISSING.values()})
    report = fetch_tasks("tiny", tiny_set["out"], BUNDLED, source=source, retries=1, give_up_after=1,
                         say=lambda m: None, sleep=lambda s: None)
    assert source.calls == [MISSING["lol_022"]] * 2  # lol_084 was not tried after lol_022 failed twice
    assert report.failed == {"lol_022": "ConnectionError: 503 Service Unavailable"}
    assert report.not_tried == ["lol_084"] and report.missing == 2
    assert "not tried in this run: 1 (lol_084)" in summary(report, "tiny")


def test_unparseable_task_is_not_retried(tiny_set):
    source, waits = MemorySource(bad={MISSING["lol_022"]}), []
    report = fetch_tasks("tiny", tiny_set["out"], BUNDLED, source=source, retries=4, say=lambda m: None,
                         sleep=waits.append)
    assert "not an SNI prompt" in report.failed["lol_022"] and waits == []
    assert source.calls.count(MISSING["lol_022"]) == 2  # one attempt: its train and test splits


def test_cli_exits_nonzero_while_tasks_are_missing(tiny_set, capsys):
    rc = main(["data", "fetch", "--set", "tiny", "-o", str(tiny_set["out"]), "--hub", str(tiny_set["hub"] / "nowhere"),
               "--descriptions-from", str(tiny_set["ref"]), "--cache-dir", str(tiny_set["cache"]),
               "--retries", "0"])
    assert rc == 1
    assert "2 of 3 tasks still missing; run `t2l data fetch` again" in capsys.readouterr().out


def test_paper_recipes_need_the_whole_set_before_fit(tmp_path):
    cfg = load_recipe("mistral_L", [f"data.fetched_dir={tmp_path}"])
    assert cfg.data.task_set == "paper479"
    with pytest.raises(T2LError, match=r"data.task_set 'paper479': 347 of 479 tasks missing .*run `t2l data fetch`"):
        check_task_set(cfg.data)
    from t2l_framework.assembly import fit

    with pytest.raises(T2LError, match="347 of 479 tasks missing"):  # before any model is loaded
        fit("mistral_L", [f"data.fetched_dir={tmp_path}", f"training.output_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_datamodule_trains_on_the_set_with_fetched_tasks(tiny_set):
    from t2l_framework.data import T2LDataModule
    from tests.tiny_world import word_tokenizer

    out = tiny_set["out"]
    fetch_tasks("tiny", out, BUNDLED, source=MemorySource(), say=lambda m: None)
    cfg = DataConfig(task_set="tiny", fetched_dir=str(out), eval_tasks=["lol_701"], n_tasks_per_batch=3,
                     max_descriptions_per_task=4, holdout_descriptions=0)
    tasks = load_tasks(BUNDLED, BUNDLED_INSTANCES, include=["lol_067", "lol_701"])
    texts = [i.input for t in tasks.values() for i in t.train + t.test] + [o for t in tasks.values()
                                                                         for i in t.train + t.test for o in i.outputs]
    dm = T2LDataModule(cfg, word_tokenizer(texts + ["test q", "train q", "a"]), lambda u, s="": u, seed=0)
    dm.setup()
    assert dm.train_task_ids == SET and dm.eval_task_ids == ["lol_701"]
    assert len(dm.train_desc_idx["lol_067"]) == 4  # the first 4 of its ~200 descriptions
    assert [dm.descriptions[i] for i in dm.train_desc_idx["lol_022"]] == ["lol_022 says hello"]
    batch = dm.train_dataset()[0]
    assert sorted(batch["task_idx"].tolist()) == [0, 1, 2]


def test_hub_source_names_the_reference_dataset(monkeypatch):
    import datasets

    seen = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: seen.update(path=path, **kw) or [])
    HubSource().rows("task022_cosmosqa_passage_inappropriate_binary", "train", 10000)
    assert seen == {"path": "Lots-of-LoRAs/task022_cosmosqa_passage_inappropriate_binary", "name": "default",
                    "split": "train[:10000]", "cache_dir": None}
