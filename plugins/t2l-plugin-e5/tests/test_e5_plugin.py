"""The e5 encoder plugin, as installed: entry-point discovery, E5's conventions, a training run.

Run from the t2l-framework checkout root (`python -m pytest plugins/t2l-plugin-e5/tests`):
the training test borrows the framework's offline tiny world (tests/tiny_world.py).
"""

from __future__ import annotations

import csv
import importlib.metadata as md
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from t2l_framework.assembly import load_recipe
from t2l_framework.assembly import build_encoder
from t2l_framework.encoders import TransformersEncoder
from t2l_framework.errors import T2LError
from t2l_framework.plugins import registry
from t2l_plugin_e5 import DEFAULT_MODEL, QUERY_PREFIX, E5Encoder

TEXTS = ["answer every input with the word apple", "say river", "stone"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 1-layer BERT with a word vocabulary that includes the prefix words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for t in TEXTS for w in t.split()} | {"query", "passage", ":"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    # transformers 5: vocab_file= would silently map every word to [UNK]; pass the dict.
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def _cfg(**kw) -> SimpleNamespace:
    base = dict(name="e5", model="all-MiniLM-L6-v2", pooling="mean", prefix="", normalize=True, max_length=64,
                batch_size=2, trust_remote_code=False)
    return SimpleNamespace(**{**base, **kw})


def test_registered_through_the_entry_point_with_version_and_source():
    reg = registry(reload=True)
    assert reg.owners["encoders"]["e5"] == "e5"
    info = next(p for p in reg.plugins if p.name == "e5")
    assert info.version == md.version("t2l-plugin-e5") == "0.1.0"
    assert info.source == "entry point t2l_plugin_e5" and info.registered == {"encoders": ["e5"]} and not info.error


def test_t2l_plugins_lists_it():
    t2l = Path(sys.executable).with_name("t2l")
    out = subprocess.run([str(t2l), "plugins"], capture_output=True, text=True, check=True,
                         env={**os.environ, "T2L_PLUGINS": "e5"}).stdout
    assert "e5 0.1.0  (entry point t2l_plugin_e5)\n  encoders: e5\n" in out, out


def test_query_prefix_is_prepended_and_rows_are_normalised(tiny_bert):
    e5 = build_encoder(_cfg(model=str(tiny_bert)))
    assert isinstance(e5, E5Encoder) and e5.prefix == QUERY_PREFIX and e5.metadata["name"] == "e5"
    emb = e5.encode(TEXTS)  # [3, 32]
    # L2-normalised, then x sqrt(dim): the framework's task-embedding scale (encoder.normalize_scale)
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((len(TEXTS),), 32 ** 0.5))
    same = TransformersEncoder(str(tiny_bert), pooling="mean", prefix="query: ", normalize=True)
    torch.testing.assert_close(emb, same.encode(TEXTS))
    bare = TransformersEncoder(str(tiny_bert), pooling="mean", prefix="", normalize=True)
    assert (emb - bare.encode(TEXTS)).abs().max() > 1e-3  # the prefix changes the numbers


def test_a_non_empty_prefix_overrides_query(tiny_bert):
    e5 = build_encoder(_cfg(model=str(tiny_bert), prefix="passage: "))
    ref = TransformersEncoder(str(tiny_bert), pooling="mean", prefix="passage: ", normalize=True)
    torch.testing.assert_close(e5.encode(TEXTS), ref.encode(TEXTS))


def test_default_model_is_e5_small_v2(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never download in tests: the error names the model
    monkeypatch.setenv("HF_HOME", "/nonexistent-t2l-e5-test")
    with pytest.raises(T2LError, match=f"cannot load '{DEFAULT_MODEL}'"):
        build_encoder(_cfg())


def test_cls_pooling_is_refused(tiny_bert):
    with pytest.raises(T2LError, match="encoder.pooling: E5 models are trained with mean pooling"):
        build_encoder(_cfg(model=str(tiny_bert), pooling="cls"))


def test_a_recipe_with_encoder_e5_validates_and_trains(tmp_path):
    from t2l_framework.assembly import fit
    from tests.tiny_world import build_world

    world = build_world(tmp_path / "world")
    overrides = ["encoder.name=e5", f"encoder.model={world['encoder']}", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "training.run_name=e5"]
    assert load_recipe(str(world["recipe"]), overrides).encoder.name == "e5"
    run = fit(str(world["recipe"]), overrides)
    meta = json.loads((run / "hypernet" / "hypernet_config.json").read_text())
    cached = load_file(str(next((tmp_path / "world" / "runs" / ".embedding_cache").glob("*.safetensors"))))
    table = cached["embeddings"]  # [n_descriptions, 32]: what the hypernetwork was trained on
    tasks = [json.loads(line) for line in (world["data"] / "tasks.jsonl").read_text().splitlines()]
    descriptions = [d for t in tasks for d in t["descriptions"]]
    e5 = E5Encoder(str(world["encoder"])).encode(descriptions)
    bare = TransformersEncoder(str(world["encoder"]), pooling="mean").encode(descriptions)
    # Every trained-on row is an E5 ("query: "-prefixed) embedding, none a bare one.
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(table, e5, compute_mode=exact).min(dim=1).values.max() < 1e-4
    assert torch.cdist(table, bare, compute_mode=exact).min(dim=1).values.min() > 1e-2
    assert meta["encoder"]["name"] == "e5"
    with open(run / "logs" / "metrics.csv") as f:
        ce = [float(r["train/ce"]) for r in csv.DictReader(f) if r.get("train/ce")]
    assert len(ce) == 4 and all(math.isfinite(v) for v in ce)
