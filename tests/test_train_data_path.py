"""The training data path: which descriptions are embedded, and length-grouped batches."""

from __future__ import annotations

import importlib
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from t2l_framework.assembly.lookups import load_recipe
from t2l_framework.run_folder import RunFolder
from tests.tiny_world import build_world

fit_mod = importlib.import_module("t2l_framework.assembly.fit")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_only_the_descriptions_a_run_reads_are_embedded(world, monkeypatch, tmp_path):
    """Only what training and validation read is embedded: the end-of-training table makes its adapters
    from text through the encoder (as `t2l eval` does), so no evaluation description is embedded ahead."""
    handed: list[str] = []
    real_build = fit_mod.build_encoder

    def counting_build(cfg):
        encoder = real_build(cfg)
        real_encode = encoder.encode

        def encode(texts):
            handed.extend(texts)
            return real_encode(texts)

        encoder.encode = encode
        return encoder

    monkeypatch.setattr(fit_mod, "build_encoder", counting_build)
    cfg = load_recipe(world["recipe"], [f"training.output_dir={tmp_path}", "training.run_name=count"])
    pieces = fit_mod.build_pieces(cfg, Path(world["recipe"]), RunFolder.for_recipe(cfg, Path(world["recipe"])))
    dm = pieces.datamodule

    read = {dm.descriptions[i] for tid in dm.train_task_ids for i in dm.train_desc_idx[tid]}
    for batch in dm.val_dataloader():
        read |= {dm.descriptions[i] for i in batch["desc_idx"].tolist()}
    every = {d for tid in dm.task_ids for d in dm.tasks[tid].descriptions}

    assert len(handed) == len(set(handed)) == len(read)  # each text once, and only the ones read
    assert set(handed) == read
    assert len(handed) < len(every)  # 48 in the world: eval tasks' descriptions are skipped
    assert not read & {d for tid in dm.eval_task_ids for d in dm.tasks[tid].descriptions}
    # training still sees every training description of its tasks except the held-out ones (8 - 2)
    assert all(len(dm.train_desc_idx[t]) == 6 for t in dm.train_task_ids)
    assert pieces.embeddings.shape == (len(read), pieces.encoder.dim)


# ---- length-grouped batches ----------------------------------------------------------------------
def _batches(seed=3, window=1, length=64, n_tasks=4, n_samples=2, tokens_per_step=0):
    """A TrainBatches over 6 tasks whose examples range from 2 to 40 tokens."""
    from t2l_framework.data.datamodule import TrainBatches

    rng = random.Random(0)
    examples = []
    for t in range(6):
        pool = []
        for j in range(12):
            n = rng.randint(2, 40)
            pool.append(([100 * t + j] * n, [-100] * (n - 1) + [7]))
        examples.append(pool)
    desc_idx = [[10 * t + k for k in range(3)] for t in range(6)]
    return TrainBatches(examples, desc_idx, n_tasks, n_samples, seed, length, pad_token_id=0, group_window=window,
                        tokens_per_step=tokens_per_step)


def _rows(batch) -> list[tuple]:
    """(unpadded ids, desc_idx, task_idx) of every row."""
    return [(tuple(ids[mask.bool()].tolist()), d, t) for ids, mask, d, t in
            zip(batch["input_ids"], batch["attention_mask"], batch["desc_idx"].tolist(), batch["task_idx"].tolist())]


def _padding(batches) -> float:
    from t2l_framework.data.length_groups import padding_fraction

    return padding_fraction(torch.cat([b["attention_mask"].flatten() for b in batches]).unsqueeze(0))


def test_length_grouping_cuts_padding_and_keeps_the_examples():
    plain, grouped = _batches(window=1), _batches(window=16)
    a, b = [plain[i] for i in range(64)], [grouped[i] for i in range(64)]
    assert _padding(a) > 0.3 and _padding(b) < _padding(a) / 3
    for w in range(4):  # each window of 16 steps holds the same rows, in other batches
        window = range(16 * w, 16 * w + 16)
        assert Counter(r for i in window for r in _rows(a[i])) == Counter(r for i in window for r in _rows(b[i]))
        assert [_rows(a[i]) for i in window] != [_rows(b[i]) for i in window]
    assert all(len(x["desc_idx"]) == 8 and x["labels"].shape == x["input_ids"].shape for x in b)


def test_length_grouping_is_deterministic_and_resume_exact():
    stream = [_rows(x) for x in (_batches(window=16)[i] for i in range(40))]
    again = _batches(window=16)
    assert [_rows(again[i]) for i in reversed(range(40))] == stream[::-1]  # any order of access, same batches
    resumed = _batches(window=16)  # a resumed run starts mid-window, e.g. at batch 21
    assert [_rows(resumed[i]) for i in range(21, 40)] == stream[21:]
    other_seed = _batches(seed=4, window=16)
    assert [_rows(other_seed[i]) for i in range(16)] != stream[:16]


def test_the_last_window_stops_at_the_end_of_the_stream():
    grouped, plain = _batches(window=16, length=20), _batches(window=1, length=20)
    tail = range(16, 20)  # a window of 4 batches: none of batches 20-31, which the run never reaches
    assert Counter(r for i in tail for r in _rows(plain[i])) == Counter(r for i in tail for r in _rows(grouped[i]))


def test_length_grouping_recipe_keys(world, tmp_path):
    from transformers import AutoTokenizer

    from t2l_framework.data.datamodule import T2LDataModule
    from t2l_framework.errors import T2LError

    tok = AutoTokenizer.from_pretrained(world["llm"])
    padding = {}
    for on in (False, True):
        cfg = load_recipe(world["recipe"], [f"data.length_grouping={str(on).lower()}", "data.length_grouping_window=8"])
        dm = T2LDataModule(cfg.data, tok, lambda user, system="": f"<user> {user} </s> <assistant>", seed=1,
                           total_batches=33)
        data = dm.train_dataset()
        padding[on] = _padding([data[i] for i in range(32)])
    assert padding[True] < padding[False] / 2
    with pytest.raises(T2LError, match="data.length_grouping_window"):
        load_recipe(world["recipe"], ["data.length_grouping_window=0"])


def test_token_budget_packs_many_rows_per_step_and_keeps_the_examples():
    budget = _batches(window=8, n_samples=4, tokens_per_step=400, length=10**6)
    paper_draws = _batches(window=1, n_samples=4)
    stream, i = [], 0
    while len(budget._starts) < 3 or i < budget._starts[2]:  # every batch of the first two windows
        stream.append(budget[i])
        i += 1
    assert all(b["input_ids"].numel() <= 400 or len(b["desc_idx"]) == 1 for b in stream)
    assert sum(len(b["desc_idx"]) for b in stream) / len(stream) > 8  # more rows than the paper's 4 x 2 batch
    assert _padding(stream) < 0.1
    rows = Counter(r for b in stream for r in _rows(b))
    assert rows == Counter(r for d in range(16) for r in _rows(paper_draws[d]))  # the draws of 2 windows x 8
    resumed = _batches(window=8, n_samples=4, tokens_per_step=400, length=10**6)
    assert [_rows(resumed[k]) for k in (i - 1, 3)] == [_rows(stream[i - 1]), _rows(stream[3])]
