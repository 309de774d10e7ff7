"""Recipe values out of range and duplicate YAML keys: `t2l validate` answers with one error line
naming the key (before, they passed validation and died later in `fit` with a long traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2l_framework.cli import main
from t2l_framework.assembly import load_recipe
from t2l_framework.errors import T2LError


def _validate(capsys, recipe: Path, *overrides: str) -> tuple[int, str]:
    code = main(["validate", str(recipe), *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("text, key, words", [
    ("training:\n  lr: -1\n", "training.lr", "got -1"),
    ("training:\n  lr: .nan\n", "training.lr", "got nan"),
    ("training:\n  lr: .inf\n", "training.lr", "got inf"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout", "in [0.0, 1.0)"),
    ("hypernet:\n  dropout: 1.0\n", "hypernet.dropout", "in [0.0, 1.0)"),
    ("trainer:\n  max_steps: -5\n", "trainer.max_steps", "a positive integer, got -5"),
    ("training:\n  checkpoint_every_n_steps: 0\n", "training.checkpoint_every_n_steps", "a positive integer, got 0"),
    ("hypernet:\n  latent_size: 10000000\n", "hypernet.latent_size", "up to 65536"),
    ("training:\n  label_smoothing: -0.1\n", "training.label_smoothing", "got -0.1"),
    ("trainer:\n  gradient_clip_val: -1.0\n", "trainer.gradient_clip_val", ">= 0.0"),
])
def test_out_of_range_values_are_one_error_line_naming_the_key(tmp_path, capsys, text, key, words):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    code, err = _validate(capsys, recipe)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert f": {key}: expected" in lines[0] and words in lines[0], lines[0]


def test_ranges_hold_for_overrides_and_accept_the_edges(tmp_path):
    with pytest.raises(T2LError, match=r"training\.lr: expected a number in \(0\.0, 10\.0\), got 0"):
        load_recipe("mistral_L", ["training.lr=0"], check_files=False)
    cfg = load_recipe("mistral_L", ["lora.dropout=0.0", "hypernet.n_residual_blocks=1", "trainer.max_steps=1",
                                    "training.checkpoint_every_n_steps=1", "trainer.gradient_clip_val=null"],
                      check_files=False)
    assert cfg.lora.dropout == 0.0 and cfg.trainer.max_steps == 1 and cfg.trainer.gradient_clip_val is None


def test_a_duplicate_key_names_the_key_and_file_line(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("training:\n  lr: 1.0e-4\n  seed: 3\n  lr: 2.0e-4\ntrainer:\n  max_steps: 5\n")
    code, err = _validate(capsys, recipe)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{recipe}:4:3: duplicate key 'lr' (first given on line 2)" in err, err
    recipe.write_text("trainer:\n  max_steps: 5\ntrainer:\n  max_steps: 6\n")  # whole sections too
    code, err = _validate(capsys, recipe)
    assert code == 1 and f"{recipe}:3:1: duplicate key 'trainer'" in err, err


def test_deeply_nested_yaml_is_one_clear_error(tmp_path, capsys):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("description: " + "[" * 100_000 + "]" * 100_000 + "\n")
    code, err = _validate(capsys, recipe)
    assert code == 1 and "Traceback" not in err and "nested too deeply" in err, err[-500:]
