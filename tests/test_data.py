"""Data loading, tokenisation and batching (tiny in-test tokenizer and tasks; no downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from t2l_framework.config import DataConfig
from t2l_framework.data import (
    IGNORE_INDEX,
    T2LDataModule,
    encode_example,
    encode_prompt,
    expand_task_ids,
    load_tasks,
)
from t2l_framework.data.files import text_lines
from t2l_framework.errors import T2LError
from tests.tiny_world import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN_TASKS = 5


def format_prompt(user: str, system: str) -> str:
    return f"<s> {system} USER : {user} ASSISTANT :"


def _task_records() -> tuple[list[dict], list[dict]]:
    tasks, instances = [], []
    for t in range(N_TRAIN_TASKS):
        tid = f"task{t}"
        tasks.append({"task": tid, "role": "train", "definition": f"defn {t}",
                      "descriptions": [f"describe task{t} way{k}" for k in range(6)]})
        for i in range(10):
            # Varied prompt and answer lengths so that rows need padding.
            instances.append({"task": tid, "split": "train", "input": " ".join(["in", tid] + ["x"] * (i % 4)),
                              "output": [" ".join([f"ans{t}"] * (1 + i % 3))]})
        for i in range(4):
            instances.append({"task": tid, "split": "test", "input": f"held {tid} q{i}", "output": [f"ans{t}", "alt"]})
    tasks.append({"task": "unseen0", "role": "eval_unseen", "descriptions": ["unseen train desc"],
                  "eval_descriptions": ["unseen eval desc a", "unseen eval desc b"]})
    instances += [{"task": "unseen0", "split": "test", "input": f"uq {i}", "output": ["uans"]} for i in range(3)]
    # lol_033 is on T2L's decontamination list: present in the files, it must still be left out.
    tasks.append({"task": "lol_033", "role": "train", "descriptions": ["leaky description"]})
    instances.append({"task": "lol_033", "split": "train", "input": "leak", "output": ["leak"]})
    return tasks, instances


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def files(tmp_path):
    tasks, instances = _task_records()
    return _write_jsonl(tmp_path / "tasks.jsonl", tasks), _write_jsonl(tmp_path / "instances.jsonl", instances)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over every word the tests use: each word is one token."""
    tasks, instances = _task_records()
    texts = [format_prompt("", "sys")] + [d for t in tasks for d in t["descriptions"] + t.get("eval_descriptions", [])]
    texts += [i["input"] for i in instances] + [o for i in instances for o in i["output"]]
    return word_tokenizer(texts, unk="[UNK]", pad="[PAD]", eos="[EOS]")


def _module(files, tokenizer, seed=7, **overrides) -> T2LDataModule:
    cfg = DataConfig(tasks_file=str(files[0]), instances_file=str(files[1]), n_tasks_per_batch=3,
                     n_samples_per_task=2, holdout_descriptions=2, max_prompt_tokens=64, max_answer_tokens=8,
                     max_eval_instances=3, system_prompt="sys")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    dm = T2LDataModule(cfg, tokenizer, format_prompt, seed=seed, total_batches=1000)
    dm.setup()
    return dm


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- tokenisation -------------------------------------------------------------------------------
def test_encode_example_masks_prompt_and_truncates(tokenizer):
    prompt = format_prompt("in task0 x x x", "sys")
    ids, labels = encode_example(tokenizer, prompt, "ans0 ans0", max_prompt_tokens=4, max_answer_tokens=8)
    full_prompt = _ids(tokenizer, prompt)
    answer = _ids(tokenizer, "ans0 ans0") + [tokenizer.eos_token_id]
    assert ids == full_prompt[-4:] + answer  # prompt cut from the LEFT, answer ends with EOS
    assert labels == [IGNORE_INDEX] * 4 + answer
    ids, labels = encode_example(tokenizer, prompt, "ans0 ans0", max_prompt_tokens=64, max_answer_tokens=1)
    assert ids[-1] != tokenizer.eos_token_id and labels[-1:] == _ids(tokenizer, "ans0")  # cut answer: no EOS


# ---- training batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_prompt, n_answer, total", [
    (30, 5, 20), (5, 30, 20), (15, 15, 20), (15, 14, 21), (12, 9, 20), (9, 12, 20), (3, 4, 20), (40, 40, 7)])
def test_total_budget_is_transformers_longest_first(n_prompt, n_answer, total):
    """The reference truncates (prompt, response) pairs with the tokenizer's truncation=True
    (longest_first) at inp_max_len; pair_budget keeps the same number of tokens of each."""
    from t2l_framework.data.encoding import pair_budget
    from tests.tiny_world import word_tokenizer

    tok = word_tokenizer(["p a"])
    enc = tok(" ".join(["p"] * n_prompt), " ".join(["a"] * n_answer), truncation=True, max_length=total,
              add_special_tokens=False)
    kept = [enc.sequence_ids().count(0), enc.sequence_ids().count(1)]
    assert list(pair_budget(n_prompt, n_answer, total)) == kept
    assert pair_budget(n_prompt, n_answer, 0) == (n_prompt, n_answer)


def test_encode_with_a_total_budget(tokenizer):
    prompt = format_prompt("in task0 x x x", "sys")  # 10 words
    full_prompt, answer = _ids(tokenizer, prompt), _ids(tokenizer, "ans0 ans0") + [tokenizer.eos_token_id]
    ids, labels = encode_example(tokenizer, prompt, "ans0 ans0", 64, 64, max_total_tokens=8)
    assert ids == full_prompt[-5:] + answer  # the longer prompt gives up tokens from its start
    assert labels == [IGNORE_INDEX] * 5 + answer
    ids, _ = encode_example(tokenizer, prompt, "ans0 " * 20, 64, 64, max_total_tokens=8)
    assert ids == full_prompt[-4:] + _ids(tokenizer, "ans0 ans0 ans0 ans0")  # both past half: 4 + 4, no EOS
    with pytest.raises(T2LError, match="data.max_total_tokens"):
        encode_example(tokenizer, prompt, "ans0", 64, 64, max_total_tokens=-1)


def test_only_the_first_descriptions_are_used(files, tokenizer):
    from t2l_framework.data import split_descriptions

    dm = _module(files, tokenizer, max_descriptions_per_task=3, holdout_descriptions=1)
    for t in range(N_TRAIN_TASKS):
        used = [dm.descriptions[i] for i in dm.train_desc_idx[f"task{t}"]] + dm.heldout_descriptions[f"task{t}"]
        assert sorted(used) == [f"describe task{t} way{k}" for k in range(3)]
    task = dm.tasks["task0"]
    assert split_descriptions(task, 0, 0, 2) == (task.descriptions[:2], [])
    with pytest.raises(T2LError, match="data.max_descriptions_per_task"):
        split_descriptions(task, 0, 0, -1)


def test_batch_shapes_and_labels(files, tokenizer):
    dm = _module(files, tokenizer)
    batch = dm.train_dataset()[0]
    B = 3 * 2
    T = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.long
    assert batch["desc_idx"].shape == (B,) and batch["task_idx"].shape == (B,)
    assert len(set(batch["task_idx"].tolist())) == 3  # distinct tasks
    assert batch["attention_mask"].sum(1).max() == T  # padded to the longest row
    assert (batch["attention_mask"].sum(1) < T).any()  # and some rows really are padded
    for row in range(B):
        n = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()  # right padding
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        # The unpadded row must be exactly encode_example of one of the task's train instances.
        task = dm.tasks[dm.task_ids[int(batch["task_idx"][row])]]
        expected = [encode_example(tokenizer, format_prompt(i.input, "sys"), i.outputs[0], 64, 8) for i in task.train]
        got = (batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist())
        assert got in expected
        ids, labels = got
        k = sum(1 for x in labels if x == IGNORE_INDEX)
        assert labels[:k] == [IGNORE_INDEX] * k and labels[k:] == ids[k:] and ids[-1] == tokenizer.eos_token_id


def test_batches_are_deterministic(files, tokenizer):
    a, b = _module(files, tokenizer).train_dataset(), _module(files, tokenizer).train_dataset()
    for i in (0, 3, 999):
        for key in ("input_ids", "labels", "desc_idx", "task_idx"):
            assert torch.equal(a[i][key], b[i][key])
    assert not all(torch.equal(a[3][k], a[4][k]) for k in ("desc_idx", "task_idx"))
    other = _module(files, tokenizer, seed=8).train_dataset()
    assert not all(torch.equal(a[3][k], other[3][k]) for k in ("desc_idx", "task_idx"))


def test_resume_sampler_starts_after_consumed_batches(files, tokenizer):
    dm = _module(files, tokenizer)
    assert list(dm.train_dataloader().sampler)[:2] == [0, 1]
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2)
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 1000  # the whole stream: Lightning counts consumed batches itself
    assert len(list(loader.sampler)) == 1000 - 10
    first = next(iter(loader))
    assert torch.equal(first["input_ids"], dm.train_dataset()[10]["input_ids"])
    assert torch.equal(first["desc_idx"], dm.train_dataset()[10]["desc_idx"])
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2, world_size=2)  # DDP: both ranks consumed
    assert next(iter(dm.train_dataloader().sampler)) == 20


def test_heldout_descriptions_never_in_training(files, tokenizer):
    dm = _module(files, tokenizer)
    held = {d for t in dm.train_task_ids for d in dm.heldout_descriptions[t]}
    assert len(held) == N_TRAIN_TASKS * 2
    assert not held & {dm.descriptions[i] for t in dm.train_task_ids for i in dm.train_desc_idx[t]}
    seen = set()
    data = dm.train_dataset()
    for i in range(300):
        seen |= {dm.descriptions[d] for d in data[i]["desc_idx"].tolist()}
    assert not seen & held
    assert len(seen) == N_TRAIN_TASKS * 4  # every training description does get used
    val = list(dm.val_dataloader())
    assert {dm.descriptions[d] for b in val for d in b["desc_idx"].tolist()} <= held
    assert len(val[0]["answers"]) == val[0]["input_ids"].shape[0] == 6
    # Task with eval_descriptions: those are its held-out set.
    assert dm.heldout_descriptions["unseen0"] == ["unseen eval desc a", "unseen eval desc b"]


def test_eval_items(files, tokenizer):
    dm = _module(files, tokenizer)
    seen, unseen = dm.eval_items("seen"), dm.eval_items("unseen")
    assert len(seen) == N_TRAIN_TASKS * 3 and len(unseen) == 3
    for item in seen + unseen:
        assert item.description in dm.heldout_descriptions[item.task]
        assert item.id.startswith(f"{item.task}-") and item.input
    # item K of a task takes the task's held-out description K, cycling
    first = [it for it in seen if it.task == seen[0].task]
    held = dm.heldout_descriptions[seen[0].task]
    assert [it.description for it in first] == [held[k % len(held)] for k in range(len(first))]
    assert unseen[0].answers == ("uans",) and seen[0].answers[1] == "alt"
    assert seen == dm.eval_items("seen")
    # the items need no tokenizer: `t2l eval RUN` reads them without the data's batches
    bare = T2LDataModule(dm.cfg, None, None, dm.seed)
    assert bare.eval_items("unseen") == unseen and bare.eval_items("seen") == seen


# ---- exclusion -----------------------------------------------------------------------------------
def test_exclusion_honoured(files, tokenizer, tmp_path):
    dm = _module(files, tokenizer, exclude_tasks=["task4"])
    assert "lol_033" not in dm.tasks and "task4" not in dm.tasks  # T2L default list + the recipe's
    assert "leaky description" not in dm.descriptions
    assert dm.train_task_ids == ["task0", "task1", "task2", "task3"] and dm.eval_task_ids == ["unseen0"]
    listed = tmp_path / "exclude.txt"
    listed.write_text("# header\ntask3\n\ntask2  # trailing comment\n")
    assert expand_task_ids([f"@{listed}", "x"]) == ["task3", "task2", "x"]
    dm = _module(files, tokenizer, exclude_tasks=[f"@{listed}"])
    assert dm.train_task_ids == ["task0", "task1", "task4"]
    with pytest.raises(T2LError, match="both requested and excluded"):
        load_tasks(*files, include=["task1"], exclude=["task1"])
    with pytest.raises(T2LError, match="did you mean 'task1'"):
        load_tasks(*files, include=["taks1"])
    with pytest.raises(T2LError, match="n_tasks_per_batch = 3, but there are only 2"):
        _module(files, tokenizer, train_tasks=["task0", "task1"])


def test_bundle_licences_and_demo_tasks():
    """The shipped bundle holds no non-commercial/GPL task, and the demo lists name usable tasks."""
    records = {}
    for _, line in text_lines(ROOT / "data/sni/tasks.jsonl.gz"):
        rec = json.loads(line)
        records[rec["task"]] = rec
        assert not any(bad in str(rec["instance_license"]) for bad in ("NC", "GPL", "Amazon", "CCPL")), rec["task"]
    excluded = set(expand_task_ids(["@data/sni/decontam_exclude.txt"]))
    assert len(excluded) == 15 and not excluded & set(records) - {"lol_454", "lol_455", "lol_769", "lol_1398", "lol_1518"}
    demo = yaml.safe_load((ROOT / "data/demo_tasks.yaml").read_text())
    assert not set(demo["train_tasks"]) & set(demo["eval_tasks"])
    for tid in demo["train_tasks"] + demo["eval_tasks"]:
        assert tid in records and tid not in excluded
    assert all("train" in records[t]["role"] for t in demo["train_tasks"])


# ---- bad files -----------------------------------------------------------------------------------
def test_bad_files_name_file_and_line(files, tmp_path):
    tasks_file, instances_file = files
    lines = instances_file.read_text().splitlines()

    bad = tmp_path / "bad_json.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"task": "task0", "split": "train",'] + lines[2:]) + "\n")
    with pytest.raises(T2LError, match=rf"{bad}:3: not valid JSON"):
        load_tasks(tasks_file, bad)

    rec = json.loads(lines[4])
    del rec["output"]
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join(lines[:4] + [json.dumps(rec)] + lines[5:]) + "\n")
    with pytest.raises(T2LError, match=rf"{missing}:5: missing field 'output' \(each line needs task, split, input, output\)"):
        load_tasks(tasks_file, missing)

    empty = tmp_path / "no_task1.jsonl"
    empty.write_text("\n".join(l for l in lines if json.loads(l)["task"] != "task1") + "\n")
    with pytest.raises(T2LError, match=rf"task 'task1' has no instances in {empty}"):
        load_tasks(tasks_file, empty)

    task_lines = tasks_file.read_text().splitlines()
    rec = json.loads(task_lines[1])
    rec["descriptions"] = []
    no_desc = tmp_path / "no_desc.jsonl"
    no_desc.write_text("\n".join([task_lines[0], json.dumps(rec)] + task_lines[2:]) + "\n")
    with pytest.raises(T2LError, match=rf"{no_desc}:2: task 'task1' has no descriptions"):
        load_tasks(no_desc, instances_file)

    with pytest.raises(T2LError, match=r"split 'dev' must be"):
        load_tasks(tasks_file, _write_jsonl(tmp_path / "split.jsonl", [{"task": "task0", "split": "dev", "input": "a", "output": "b"}]))
