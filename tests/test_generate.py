"""`t2l generate`: PEFT adapter folders from descriptions of a tiny trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2l_framework.cli import main
from tests.tiny_world import build_trained_world

ROOT = Path(__file__).resolve().parents[1]
# `t2l generate` as a user runs it, with its default --dtype auto: CI runs these under both picks.
pytestmark = pytest.mark.dtype_sensitive

DESCRIPTIONS = ["answer every input with the word apple", "answer every input with the word tiger",
                "answer every input with the word piano"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_trained_world(tmp_path_factory.mktemp("generate_world"), "gen")


def _t2l(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "t2l_framework.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _peft_lora_b(world, folder: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["llm"]), folder)
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])


def test_one_description_writes_a_folder_peft_loads(world, tmp_path):
    res = _t2l("generate", str(world["run"]), DESCRIPTIONS[0], "-o", "apple", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "apple"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(world["llm"])
    assert _peft_lora_b(world, folder).abs().sum() > 0  # generated, not PEFT's zero init


def test_several_descriptions_write_numbered_folders_in_one_batch(world, tmp_path):
    (tmp_path / "more.txt").write_text(f"{DESCRIPTIONS[1]}\n\n{DESCRIPTIONS[2]}\n")
    res = _t2l("generate", str(world["run"]), DESCRIPTIONS[0], "--from-file", "more.txt", "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    index = json.loads((tmp_path / "out" / "descriptions.json").read_text())
    assert [a["description"] for a in index["adapters"]] == DESCRIPTIONS
    assert [a["folder"] for a in index["adapters"]] == ["adapter_000", "adapter_001", "adapter_002"]
    loras = [_peft_lora_b(world, tmp_path / "out" / a["folder"]) for a in index["adapters"]]
    assert not torch.allclose(loras[0], loras[1]) and not torch.allclose(loras[1], loras[2])


def test_chat_prints_base_and_adapted_answers(world, tmp_path, capsys):
    from t2l_framework.assembly import load_runtime

    assert main(["generate", str(world["run"]), DESCRIPTIONS[0], "-o", str(tmp_path / "a"),
                 "--chat", "red blue small", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    runtime = load_runtime(world["run"])
    base, adapted = runtime.chat(["red blue small"] * 2, [None, runtime.adapters(DESCRIPTIONS[:1])], max_new_tokens=5)
    assert f"base model  {base.text.strip()}" in out
    assert f"adapted     {adapted.text.strip()}" in out


def test_errors_are_one_line_without_traceback(world, tmp_path, capsys):
    assert main(["generate", str(tmp_path), "a task"]) == 1
    assert "not a T2L run folder" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["generate", str(world["run"]), "a task", "-o", str(tmp_path / "taken")]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["generate", str(world["run"])]) == 1
    assert "task descriptions" in capsys.readouterr().err
    assert main(["generate", str(world["run"]), "--from-file", str(tmp_path / "nope.txt")]) == 1
    assert "--from-file" in capsys.readouterr().err


def test_runs_saved_before_reference_task_embeddings_keep_unit_norm(world, tmp_path):
    """A run whose config predates ``encoder.normalize_scale`` was trained on unit-norm
    embeddings without the full stop: loading it must not silently switch to the new ones."""
    import json
    import shutil

    from t2l_framework.assembly import load_adapter_generator

    new = load_adapter_generator(world["run"], "cpu")
    assert new.encoder.normalize_scale == "sqrt_dim" and new.encoder.full_stop
    old = tmp_path / "old_run"
    shutil.copytree(world["run"], old)
    config_file = old / "hypernet" / "hypernet_config.json"
    config = json.loads(config_file.read_text())
    for key in ("normalize_scale", "full_stop"):
        config["encoder"].pop(key)
    config_file.write_text(json.dumps(config))
    legacy = load_adapter_generator(old, "cpu")
    assert legacy.encoder.normalize_scale == "unit" and not legacy.encoder.full_stop
    emb = legacy.encoder.encode(["answer with apple"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
