"""The training data path: which descriptions are embedded, and length-grouped batches."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from t2l_framework.assembly.lookups import load_recipe
from t2l_framework.run_folder import RunFolder
from tests.tiny_world import build_world

fit_mod = importlib.import_module("t2l_framework.assembly.fit")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_only_the_descriptions_a_run_reads_are_embedded(world, monkeypatch, tmp_path):
    """Unseen tasks have many evaluation descriptions; only those the table picks are embedded."""
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
    for split in ("seen", "unseen"):
        for item in dm.eval_items(split):
            read |= {dm.descriptions[item["desc_idx"]], dm.descriptions[item["other_desc_idx"]]}
    for batch in dm.val_dataloader():
        read |= {dm.descriptions[i] for i in batch["desc_idx"].tolist()}
    every = {d for tid in dm.task_ids for d in dm.tasks[tid].descriptions}

    assert len(handed) == len(set(handed)) == len(read)  # each text once, and only the ones read
    assert set(handed) == read
    assert len(handed) < len(every)  # 48 in the world: eval tasks' unused descriptions are skipped
    # training still sees every training description of its tasks except the held-out ones (8 - 2)
    assert all(len(dm.train_desc_idx[t]) == 6 for t in dm.train_task_ids)
    assert pieces.embeddings.shape == (len(read), pieces.encoder.dim)
