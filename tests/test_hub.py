"""Runs on the Hub: save_pretrained / from_pretrained (folder and the Hub's cache, offline),
`t2l push` against a local stand-in of the Hub's HTTP API, the model card, and the untrusted
checks on what comes from the Hub. No network: the stand-in listens on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from huggingface_hub.repocard import metadata_load

from t2l_framework.assembly.hub import T2LRun, resolve_run
from t2l_framework.assembly.loading import load_adapter_generator
from t2l_framework.assembly.model_card import card_data
from t2l_framework.cli import main
from t2l_framework.errors import T2LError
from tests.hub_standin import HubStandIn
from tests.tiny_world import build_trained_world

ROOT = Path(__file__).resolve().parents[1]
DESC = "answer every input with the word apple variant 1"
SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "my-org/tiny-t2l"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_trained_world(tmp_path_factory.mktemp("hub_world"), "hub")


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    T2LRun(world["run"]).save_pretrained(out)
    return out


def _hub_cache(saved: Path, root: Path, repo: str = REPO) -> Path:
    """The Hub's cache layout (models--ORG--NAME/{refs,snapshots}) holding ``saved`` at commit SHA."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(saved, repo_dir / "snapshots" / SHA)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(SHA)
    return root


def _adapters(folder, desc=DESC):
    gen = load_adapter_generator(folder, "cpu")
    return gen.adapters([desc])


def test_save_pretrained_writes_the_hub_layout_and_loads_back(world, saved):
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "hypernet/hypernet.safetensors", "hypernet/hypernet_config.json",
                     "recipe.yaml", "training_status.json", "training_tasks.txt"]
    assert (saved / "training_tasks.txt").read_text().split() == ["toy_0", "toy_1", "toy_2", "toy_3"]
    loaded = T2LRun.from_pretrained(saved)
    assert loaded.root == saved
    a, b = _adapters(world["run"]), _adapters(loaded.root)
    for m in a.A:
        torch.testing.assert_close(a.A[m], b.A[m], rtol=0, atol=0)
        torch.testing.assert_close(a.B[m], b.B[m], rtol=0, atol=0)


def test_model_card_header_parses_and_the_body_comes_from_the_run(world, saved, tmp_path):
    meta = metadata_load(saved / "README.md")
    assert meta["library_name"] == "t2l-framework"
    assert {"text-to-lora", "lora", "hypernetwork"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["datasets"]
    assert "base_model" not in meta  # the tiny world's base model is a local folder, not a hub id
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "t2l-framework"
    for words in ("`per_layer`", "LoRA rank / alpha | 2 / 4.0", "`q_proj`, `v_proj`", "training tasks: 4",
                  "steps: 2 of 2", "t2l generate", "PeftModel.from_pretrained"):
        assert words in card.text, words
    # the end-of-training table and t2l eval results go in when the run has them
    run = tmp_path / "run"
    shutil.copytree(world["run"], run, ignore=shutil.ignore_patterns("checkpoints", "logs", "tb"))
    (run / "report.md").write_text("| condition | exact match |\n|---|---|\n| (c) T2L | 0.875 |\n")
    (run / "eval").mkdir()
    (run / "eval" / "results.md").write_text("| adapter | arc_easy |\n|---|---|\n| t2l | 0.61 |\n")
    T2LRun(run).save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| (c) T2L | 0.875 |" in text and "| t2l | 0.61 |" in text
    assert card_data("HuggingFaceTB/SmolLM2-135M-Instruct", "sentence-transformers/all-MiniLM-L6-v2").base_model \
        == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_hub_id_loads_from_the_hub_cache_offline_with_revision(saved, tmp_path, monkeypatch):
    cache = _hub_cache(saved, tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    assert resolve_run(REPO) == snapshot
    assert resolve_run(REPO, revision=SHA) == snapshot
    assert T2LRun.from_pretrained(REPO, revision=SHA).root == snapshot
    a, b = _adapters(saved), _adapters(REPO)
    torch.testing.assert_close(a.A["q_proj"], b.A["q_proj"], rtol=0, atol=0)
    with pytest.raises(T2LError, match="not in the Hub cache"):
        resolve_run("my-org/not-downloaded")


def test_t2l_generate_takes_a_hub_id_offline(saved, tmp_path):
    cache = _hub_cache(saved, tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT),
           "T2L_CACHE": str(tmp_path / "t2l")}
    out = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-m", "t2l_framework.cli", "generate", REPO, DESC, "-o", str(out),
                           "--revision", SHA, "--dtype", "float32", "--no-familiarity"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_t2l_eval_takes_a_hub_id_offline_and_scores_as_the_folder(saved, tmp_path, monkeypatch, capsys):
    """`t2l eval ORG/NAME --revision SHA` (Hub cache, offline) gives the folder's own numbers, item by item."""
    cache = _hub_cache(saved, tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    common = ["--dtype", "float32", "--benchmarks", "arc_easy", "--adapters", "base,t2l", "--limit", "2",
              "--n-descriptions", "1", "--max-new-tokens", "4", "--no-cache"]
    assert main(["eval", str(saved), *common, "-o", str(tmp_path / "folder")]) == 0
    assert main(["eval", REPO, "--revision", SHA, *common, "-o", str(tmp_path / "hub")]) == 0
    folder, hub = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("folder", "hub"))
    assert hub["scores"] == folder["scores"] and set(hub["scores"]) == {"base", "t2l"}
    lines = [(tmp_path / d / "predictions.jsonl").read_text().splitlines() for d in ("folder", "hub")]
    assert lines[0] == lines[1] and len(lines[0]) == 2 * 2
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    capsys.readouterr()
    assert main(["eval", REPO, *common, "-o", str(tmp_path / "missing")]) != 0  # not cached: one clear line
    assert "not in the Hub cache" in capsys.readouterr().err


def test_what_comes_from_the_hub_goes_through_the_untrusted_checks(saved, tmp_path, monkeypatch):
    doctored = tmp_path / "doctored"
    shutil.copytree(saved, doctored)
    recipe = yaml.safe_load((doctored / "recipe.yaml").read_text())
    recipe["base_model"]["trust_remote_code"] = True
    (doctored / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cache = _hub_cache(doctored, tmp_path / "hf", "evil-org/run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(T2LError, match="base_model.trust_remote_code is true"):
        load_adapter_generator("evil-org/run", "cpu")


def test_resolve_run_names_what_is_wrong(tmp_path):
    with pytest.raises(T2LError, match="not a hub id"):
        resolve_run(str(tmp_path / "missing" / "run"))
    with pytest.raises(T2LError, match="a revision applies to hub ids"):
        resolve_run(tmp_path, revision="main")
    with pytest.raises(T2LError, match="relative folder inside the repo"):
        resolve_run("my-org/x", subfolder="../../etc")


def test_t2l_push_uploads_the_run_to_the_hub_api(world, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    with HubStandIn(lifetime_s=120) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        assert main(["push", str(world["run"]), REPO, "--private", "--create-pr"]) == 0
        assert main(["push", str(world["run"]), REPO, "--revision", "experiment"]) == 0
        assert main(["push", str(world["run"]), REPO, "--revision", "x", "--create-pr"]) == 1
    out = capsys.readouterr()
    assert "discussions/1" in out.out and "pull request against the default branch" in out.err
    created = [json.loads(r["body"]) for r in hub.requests if r["path"] == "/api/repos/create"]
    assert created[0]["visibility"] == "private" and "visibility" not in created[1]
    writes = [r for r in hub.requests if r["path"].startswith(("/api/repos/", "/api/models/"))]
    assert len(writes) >= 8 and all(r["authorization"] == "Bearer hf_standin_token" for r in writes)
    assert hub.pull_requests and hub.pull_requests[0]["pullRequest"] is True
    assert hub.branches == [(REPO, "experiment")]
    pr, branch = hub.commits
    assert pr["revision"] == "refs/pr/1" and branch["revision"] == "experiment"
    files = pr["files"]
    assert not any(p.startswith(("checkpoints/", "logs/", "tb/")) for p in files)
    weights = world["run"] / "hypernet" / "hypernet.safetensors"
    assert files["hypernet/hypernet.safetensors"] == weights.read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "t2l-framework" and f"t2l generate {REPO}" in card.text
    assert yaml.safe_load(files["config.json"])["target_modules"] == ["q_proj", "v_proj"]


def test_import_reference_takes_a_hub_id_and_subfolder(tmp_path, monkeypatch, capsys):
    release = tmp_path / "release" / "trained_t2l" / "tiny_t2l"
    release.mkdir(parents=True)
    (release / "args.yaml").write_text("model_dir: x\n")
    cache = _hub_cache(tmp_path / "release", tmp_path / "hf", "SakanaAI/text-to-lora")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache / "models--SakanaAI--text-to-lora" / "snapshots" / SHA
    assert resolve_run("SakanaAI/text-to-lora", subfolder="trained_t2l/tiny_t2l") == snapshot / "trained_t2l" / "tiny_t2l"
    # the command reaches the reference reader with the snapshot's folder (which then names the missing file)
    assert main(["import-reference", "SakanaAI/text-to-lora", "--subfolder", "trained_t2l/tiny_t2l",
                 "-o", str(tmp_path / "run")]) == 1
    assert "trained_t2l/tiny_t2l" in capsys.readouterr().err
    with pytest.raises(T2LError, match="has no folder 'trained_t2l/other'"):
        resolve_run("SakanaAI/text-to-lora", subfolder="trained_t2l/other")
