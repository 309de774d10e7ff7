"""Recipes: every shipped one validates; each kind of mistake gets one clear error."""

from pathlib import Path

import pytest

from t2l_framework.assembly import load_recipe
from t2l_framework.config import find_recipe, recipe_description, recipes_dir
from t2l_framework.errors import T2LError

SHIPPED = sorted(recipes_dir().glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"mistral_L", "mistral_M", "mistral_S"} <= names
    assert any("llama" in n for n in names) and any("gemma" in n for n in names)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    cfg = load_recipe(path)
    assert cfg.lora.rank > 0
    assert recipe_description(path), f"{path.name} needs a one-line description"


def test_paper_recipes_carry_paper_settings():
    heads = {"mistral_L": "per_layer", "mistral_M": "shared", "mistral_S": "chunked"}
    for name, head in heads.items():
        cfg = load_recipe(name)
        assert cfg.hypernet.head == head
        assert cfg.base_model.name_or_path == "mistralai/Mistral-7B-Instruct-v0.2"
        assert cfg.encoder.model == "Alibaba-NLP/gte-large-en-v1.5"
        assert (cfg.lora.rank, list(cfg.lora.target_modules)) == (8, ["q_proj", "v_proj"])
        assert cfg.training.lr == 2.5e-5 and cfg.data.n_tasks_per_batch == 8
        assert cfg.training.l2_penalty == 1e-3 and cfg.training.label_smoothing == 0.1
        assert cfg.training.neftune_alpha == 5.0


def test_overrides_apply_in_dotlist_form():
    cfg = load_recipe("mistral_L", ["hypernet.head=chunked", "trainer.max_steps=10"])
    assert cfg.hypernet.head == "chunked" and cfg.trainer.max_steps == 10


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("hypernet:\n  haed: per_layer\n", [], r"unknown key 'hypernet.haed' \(did you mean 'head'\?\)"),
        ("", ["trainer.max_step=3"], r"unknown key 'trainer.max_step' \(did you mean 'max_steps'\?\)"),
        ("trainer:\n  max_steps: ten\n", [], r"wrong type for 'trainer.max_steps': expected an integer"),
        ("lora:\n  target_modules: q_proj\n", [], r"wrong type for 'lora.target_modules': expected a list"),
        ("hypernet:\n  head: per_layr\n", [], r"hypernet.head: unknown head 'per_layr' \(did you mean 'per_layer'\?\)"),
        ("encoder:\n  name: sentence_transfomers\n", [], r"encoder.name: unknown encoder 'sentence_transfomers' \(did you mean"),
        ("base_model:\n  family: mistrall\n", [], r"base_model.family: unknown base model 'mistrall' \(did you mean 'mistral'\?\)"),
        ("data:\n  tasks_file: nowhere/tasks.jsonl\n", [], r"data.tasks_file: file or folder 'nowhere/tasks.jsonl' does not exist"),
        ("training:\n  mode: sftt\n", [], r"training.mode: 'sftt' is not allowed \(did you mean 'sft'\?\)"),
        ("lora:\n  rank: 0\n", [], r"lora.rank: expected a positive integer"),
        ("hypernet:\n  head: per_layer\n   latent_size: 5\n", [], r"recipe.yaml:3:\d+: malformed YAML"),
        ("", ["trainer.max_steps"], r"not of the form key=value"),
        ("hypernet:\n  head: no_such_module_xyz:Head\n", [], r"hypernet.head: cannot import module 'no_such_module_xyz'"),
    ],
)
def test_bad_recipes_give_one_clear_error(tmp_path, text, overrides, message):
    with pytest.raises(T2LError, match=message):
        load_recipe(_write(tmp_path, text), overrides)


def test_unknown_recipe_name_suggests_shipped_one():
    with pytest.raises(T2LError, match="did you mean 'mistral_L'"):
        find_recipe("mistral_l")


def test_loaded_recipe_is_read_only():
    cfg = load_recipe("mistral_L")
    with pytest.raises(Exception):
        cfg.lora.rank = 4
