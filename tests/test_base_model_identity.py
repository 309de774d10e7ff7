"""A hypernetwork knows its base model by a recorded identity (hub revision, architecture hash),
not by its folder's name: two different models both called ``model/`` no longer match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from t2l_framework.config import HypernetConfig, LoraConfig
from t2l_framework.errors import T2LError
from t2l_framework.hypernet import HyperNetwork
from t2l_framework.llm.identity import base_model_identity
from t2l_framework.lora.weights import ModuleShapes
from t2l_framework.run_folder import HYPERNET_CONFIG

SHAPES = ModuleShapes(2, {"q_proj": (16, 16), "v_proj": (16, 8)})
LORA = LoraConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"])


def _model_folder(folder: Path, hidden: int = 16, transformers_version: str = "4.57.0") -> Path:
    """A base model folder as far as its identity goes: config.json and a safetensors file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                    "num_hidden_layers": 2, "transformers_version": transformers_version}))
    save_file({f"model.layers.{i}.self_attn.q_proj.weight": torch.zeros(hidden, hidden) for i in range(2)},
              folder / "model.safetensors")
    return folder


def _save(base_model: str, out: Path) -> Path:
    cfg = HypernetConfig(head="per_layer", task_dim=8, layer_emb_dim=4, module_emb_dim=4, latent_size=16)
    HyperNetwork(SHAPES, 12, cfg, LORA, base_model=base_model).save_pretrained(out)
    return out


def test_two_different_models_of_one_folder_name_do_not_match(tmp_path):
    trained_on = _model_folder(tmp_path / "a" / "model")
    other = _model_folder(tmp_path / "b" / "model", hidden=32)
    hyper = _save(str(trained_on), tmp_path / "hypernet")
    recorded = json.loads((hyper / HYPERNET_CONFIG).read_text())["base_model_identity"]
    assert recorded["name"] == str(trained_on) and len(recorded["sha256"]) == 64 and recorded["revision"] is None
    with pytest.raises(T2LError) as err:
        HyperNetwork.from_pretrained(hyper, expect_base_model=str(other))
    message = str(err.value)
    assert f"trained for base model '{trained_on}', not '{other}'" in message and "do not fit another model" in message
    assert f"(recorded: architecture sha256 {recorded['sha256'][:12]}; here: architecture sha256 " in message


def test_a_copy_of_the_same_model_elsewhere_matches(tmp_path):
    trained_on = _model_folder(tmp_path / "a" / "model")
    copy = _model_folder(tmp_path / "elsewhere" / "my-copy", transformers_version="5.0.0")  # rewritten by a newer tool
    hyper = _save(str(trained_on), tmp_path / "hypernet")
    assert HyperNetwork.from_pretrained(hyper, expect_base_model=str(copy)).rank == 2
    shutil.rmtree(trained_on)  # the training machine's folder is gone: the hash still identifies it
    assert HyperNetwork.from_pretrained(hyper, expect_base_model=str(copy)).rank == 2


def test_an_old_checkpoint_without_identity_falls_back_to_the_name_and_says_so(tmp_path, capsys):
    trained_on = _model_folder(tmp_path / "a" / "model")
    hyper = _save(str(trained_on), tmp_path / "hypernet")
    config = json.loads((hyper / HYPERNET_CONFIG).read_text())
    del config["base_model_identity"]
    (hyper / HYPERNET_CONFIG).write_text(json.dumps(config))
    other = _model_folder(tmp_path / "b" / "model", hidden=32)
    assert HyperNetwork.from_pretrained(hyper, expect_base_model=str(other)).rank == 2  # as before: same name
    assert "base model compared by name only" in capsys.readouterr().err
    with pytest.raises(T2LError, match="not 'somebody/else'"):
        HyperNetwork.from_pretrained(hyper, expect_base_model="somebody/else")


def test_a_malformed_identity_is_refused_naming_the_key(tmp_path):
    hyper = _save(str(_model_folder(tmp_path / "model")), tmp_path / "hypernet")
    config = json.loads((hyper / HYPERNET_CONFIG).read_text())
    config["base_model_identity"]["sha256"] = "not a hash; secret=hunter2"
    (hyper / HYPERNET_CONFIG).write_text(json.dumps(config))
    with pytest.raises(T2LError, match=r"'base_model_identity.sha256' must be null or") as err:
        HyperNetwork.from_pretrained(hyper)
    assert "hunter2" not in str(err.value)


def test_a_hub_model_is_known_by_its_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    def cache(commit: str, hidden: int) -> None:
        repo = tmp_path / "hub" / "models--org--tiny"
        _model_folder(repo / "snapshots" / commit, hidden=hidden)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_model_identity("org/absent") == {"name": "org/absent", "revision": None, "sha256": None}
    cache("a" * 40, hidden=16)
    identity = base_model_identity("org/tiny")
    assert identity["revision"] == "a" * 40 and len(identity["sha256"]) == 64
    hyper = _save("org/tiny", tmp_path / "hypernet")
    assert HyperNetwork.from_pretrained(hyper, expect_base_model="org/tiny").rank == 2
    cache("b" * 40, hidden=32)  # the hub moved on to a different model under the same id
    with pytest.raises(T2LError, match="'org/tiny' \\(recorded: revision aaaaaaaaaaaa"):
        HyperNetwork.from_pretrained(hyper, expect_base_model="org/tiny")
