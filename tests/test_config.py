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


def test_an_empty_override_of_a_string_field_is_the_empty_string():
    cfg = load_recipe("smollm2_demo", ["eval.baseline_adapter=", "training.run_name="], check_files=False)
    assert cfg.eval.baseline_adapter == "" and cfg.training.run_name == ""
    assert load_recipe("smollm2_demo", check_files=False).eval.baseline_adapter  # the recipe sets one
    with pytest.raises(T2LError, match="wrong type for 'trainer.max_steps'"):
        load_recipe("smollm2_demo", ["trainer.max_steps="], check_files=False)


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


def test_choices_and_ranges_sit_beside_their_fields_and_are_what_validation_checks(tmp_path):
    from dataclasses import fields

    from t2l_framework.config import CHOICES, RANGES, HypernetConfig, TrainerConfig

    meta = {f.name: f.metadata for f in fields(HypernetConfig)}
    assert meta["dropout"]["range"] == RANGES["hypernet.dropout"] == (0.0, 1.0, True) and meta["dropout"]["help"]
    assert meta["chunk_position"]["choices"] == CHOICES["hypernet.chunk_position"] == ("rotary", "learned")
    strategy = next(f for f in fields(TrainerConfig) if f.name == "strategy")
    assert strategy.metadata["choices"] == CHOICES["trainer.strategy"] and "fsdp_base" in CHOICES["trainer.strategy"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("hypernet:\n  chunk_position: rotry\n")
    with pytest.raises(T2LError, match=rf"{bad}: hypernet.chunk_position: 'rotry' is not allowed \(did you mean "
                                       r"'rotary'\?\); expected one of: rotary, learned"):
        load_recipe(bad, check_files=False)
    with pytest.raises(T2LError, match=r"^recipe: lora.rank: expected a positive integer up to 4096, got 0$"):
        load_recipe(overrides=["lora.rank=0"], check_files=False)


def test_one_source_for_task_sets_strategies_and_dtypes():
    from t2l_framework import config
    from t2l_framework.data import task_sets
    from t2l_framework.llm.dtype import DTYPE_CHOICES
    from t2l_framework.training import sharding, strategies

    assert task_sets.TASK_SETS is config.TASK_SETS and config.CHOICES["data.task_set"] == ("", *config.TASK_SETS)
    assert strategies.DEEPSPEED_STRATEGIES == {
        "deepspeed_stage_1": (1, False), "deepspeed_stage_2": (2, False), "deepspeed_stage_2_offload": (2, True),
        "deepspeed_stage_3": (3, False), "deepspeed_stage_3_offload": (3, True)}
    assert sharding.STRATEGY in config.CHOICES["trainer.strategy"]
    assert DTYPE_CHOICES == config.CHOICES["base_model.dtype"]


def test_a_removed_key_says_why(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("encoder:\n  trainable: true\n")
    with pytest.raises(T2LError, match=rf"^{recipe}: 'encoder.trainable' was removed: it never did anything"):
        load_recipe(recipe, check_files=False)
    recipe.write_text("encoder:\n  trainable: false\n  pooling: cls\n")  # what every older run folder's recipe holds
    assert load_recipe(recipe, check_files=False).encoder.pooling == "cls"
    with pytest.raises(T2LError, match="'encoder.trainable' was removed"):
        load_recipe(overrides=["encoder.trainable=true"], check_files=False)
    shipped_text = "\n".join(p.read_text() for p in SHIPPED)
    assert "trainable" not in shipped_text


def test_one_cache_root_with_a_folder_per_kind(tmp_path, monkeypatch, capsys):
    from t2l_framework import caches
    from t2l_framework.assembly.inspect import cache_root as inspect_cache
    from t2l_framework.eval.cache import default_cache_dir
    from t2l_framework.llm.loading import cache_root as model_cache

    monkeypatch.delenv("T2L_CACHE_DIR", raising=False)
    monkeypatch.setenv("T2L_CACHE", str(tmp_path / "root"))
    assert (model_cache(), default_cache_dir(), inspect_cache()) == tuple(
        tmp_path / "root" / kind for kind in ("models", "eval", "inspect"))
    monkeypatch.delenv("T2L_CACHE")
    assert caches.cache_root() == Path.home() / ".cache" / "t2l"
    monkeypatch.setenv("T2L_CACHE_DIR", str(tmp_path / "old"))  # the deprecated name of the same root
    caches._deprecated_notice.cache_clear()
    assert default_cache_dir() == tmp_path / "old" / "eval" and "T2L_CACHE_DIR is deprecated" in capsys.readouterr().err
