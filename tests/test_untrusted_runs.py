"""Run folders and checkpoints are untrusted input: opening one never executes code from it
without --trust-remote-code, the current folder is never searched for modules, and malformed
files give one clear error before anything large is allocated."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from t2l_framework.cli import main
from t2l_framework.errors import T2LError
from t2l_framework.hypernet.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from t2l_framework.assembly import load_adapter_generator, load_runtime
from t2l_framework.training.checkpoint_io import load_checkpoint_file, save_checkpoint_file
from tests.tiny_world import build_trained_world

HEAD_SOURCE = """\
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from t2l_framework.hypernet.heads import PerLayerHead as Head
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_trained_world(tmp_path_factory.mktemp("untrusted_world"), "trusted")


@pytest.fixture
def run(world, tmp_path) -> Path:
    """A fresh copy of the trained run folder, to doctor."""
    return Path(shutil.copytree(world["run"], tmp_path / "downloaded_run"))


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_recipe(run: Path, change) -> None:
    data = yaml.safe_load((run / "recipe.yaml").read_text())
    change(data)
    (run / "recipe.yaml").write_text(yaml.safe_dump(data))


def _plant_head(folder: Path, marker: Path, name: str = "planted_head") -> str:
    """A module that records being imported; returns its import path."""
    (folder / f"{name}.py").write_text(HEAD_SOURCE.format(marker=str(marker)))
    return f"{name}:Head"


def _generate(capsys, run: Path, out: Path, *flags: str) -> tuple[int, str]:
    code = main(["generate", str(run), "answer every input with the word apple variant 1", "-o", str(out), *flags])
    return code, capsys.readouterr().err


# --- code named by a run folder -------------------------------------------------------------

def test_a_recipe_asking_for_remote_code_is_refused_without_the_flag(world, run, tmp_path, capsys):
    """A downloaded run whose base model ships Python (auto_map) must not get it executed."""
    model = run / "model"
    shutil.copytree(world["llm"], model)
    marker = tmp_path / "model_code_ran"
    (model / "evil_model.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    _edit_json(model / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil_model.Config",
                                                                   "AutoModelForCausalLM": "evil_model.Model"}))

    def trusting(recipe):
        recipe["base_model"].update(name_or_path=str(model), trust_remote_code=True)

    _edit_recipe(run, trusting)
    with pytest.raises(T2LError, match=r"base_model.trust_remote_code is true.*--trust-remote-code"):
        load_runtime(run)
    code, err = _generate(capsys, run, tmp_path / "out")
    assert code == 1 and "--trust-remote-code" in err and len(err.strip().splitlines()) == 2, err  # [t2l] + error
    assert not marker.exists()
    _edit_recipe(run, lambda r: r["base_model"].update(trust_remote_code=False))
    _edit_recipe(run, lambda r: r["encoder"].update(trust_remote_code=True))
    with pytest.raises(T2LError, match=r"encoder.trust_remote_code is true"):
        load_adapter_generator(run, "cpu")


@pytest.mark.dtype_sensitive  # `t2l generate` with its default --dtype auto
def test_a_head_import_path_in_a_checkpoint_is_not_imported_without_the_flag(run, tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "head_imported"
    head = _plant_head(site, marker)
    monkeypatch.syspath_prepend(str(site))
    _edit_json(run / "hypernet" / CONFIG_NAME, lambda c: c["hypernet"].update(head=head))
    _edit_recipe(run, lambda r: r["hypernet"].update(head=head))
    with pytest.raises(T2LError, match=r"hypernet.head 'planted_head:Head' is an import path.*--trust-remote-code"):
        load_adapter_generator(run, "cpu")
    code, err = _generate(capsys, run, tmp_path / "out")
    assert code == 1 and "import path" in err
    assert not marker.exists() and "planted_head" not in sys.modules
    # the flag is what allows it, and then the run works
    generator = load_adapter_generator(run, "cpu", trust_remote_code=True)
    assert marker.exists() and type(generator.hypernet.head).__name__ == "PerLayerHead"
    code, err = _generate(capsys, run, tmp_path / "out2", "--trust-remote-code")
    assert code == 0 and (tmp_path / "out2" / "adapter_config.json").is_file(), err


def test_the_current_folder_is_never_searched_for_modules(run, tmp_path, monkeypatch):
    """A downloaded run opened from its own folder must not import a module that sits next to it."""
    marker = tmp_path / "cwd_module_ran"
    head = _plant_head(run, marker, "next_to_the_run")
    _edit_json(run / "hypernet" / CONFIG_NAME, lambda c: c["hypernet"].update(head=head))
    _edit_recipe(run, lambda r: r["hypernet"].update(head=head))
    monkeypatch.chdir(run)
    path_before = list(sys.path)
    with pytest.raises(T2LError, match=r"cannot import module 'next_to_the_run'.*current folder is not searched"):
        load_adapter_generator(run, "cpu", trust_remote_code=True)
    assert not marker.exists() and sys.path == path_before and str(run) not in sys.path


def test_validate_looks_a_head_up_without_importing_it(world, tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "validated_head_imported"
    head = _plant_head(site, marker, "validated_head")
    monkeypatch.syspath_prepend(str(site))
    assert main(["validate", str(world["recipe"]), f"hypernet.head={head}"]) == 0
    assert not marker.exists() and "validated_head" not in sys.modules
    capsys.readouterr()
    assert main(["validate", str(world["recipe"]), "hypernet.head=nowhere_at_all:Head"]) == 1
    assert "cannot import module 'nowhere_at_all'" in capsys.readouterr().err
    assert main(["validate", str(world["recipe"]), f"hypernet.head={head}", "--trust-remote-code"]) == 0
    assert marker.exists()


# --- malformed files ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("lora"), r"missing key 'lora'"),
    (lambda c: c["lora"].pop("rank"), r"missing key 'lora.rank'"),
    (lambda c: c.update(enc_dim="32"), r"'enc_dim' must be an integer"),
    (lambda c: c["shapes"]["shapes"].update(q_proj=[64]), r"'shapes.shapes.q_proj' must be \[in_features, out_features\]"),
    (lambda c: c["hypernet"].update(dropout=2.0), r"'hypernet.dropout': expected a number in \[0.0, 1.0\)"),
    (lambda c: c.update(format="something-else"), r"not a t2l hypernetwork config"),
])
def test_malformed_hypernet_config_is_one_clear_error(run, change, words):
    _edit_json(run / "hypernet" / CONFIG_NAME, change)
    with pytest.raises(T2LError, match=words):
        load_adapter_generator(run / "hypernet", "cpu")


def test_absurd_sizes_are_refused_before_allocating(run):
    """latent_size 10,000,000 made the loader allocate 7.7 GB before any check."""
    _edit_json(run / "hypernet" / CONFIG_NAME, lambda c: c["hypernet"].update(latent_size=10_000_000))
    start = time.perf_counter()
    with pytest.raises(T2LError, match=r"'hypernet.latent_size': expected a positive integer up to 65536"):
        load_adapter_generator(run / "hypernet", "cpu")
    # in range but not what the file holds: caught on the safetensors header, on the meta device
    _edit_json(run / "hypernet" / CONFIG_NAME, lambda c: c["hypernet"].update(latent_size=60_000))
    with pytest.raises(T2LError, match=r"weights do not match this hypernetwork \(wrong shapes: .*60000"):
        load_adapter_generator(run / "hypernet", "cpu")
    assert time.perf_counter() - start < 10


def test_a_checkpoint_missing_a_tensor_is_one_clear_error(run, tmp_path):
    weights = run / "hypernet" / WEIGHTS_NAME
    state = load_file(weights)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, weights)
    with pytest.raises(T2LError, match=rf"weights do not match this hypernetwork \(missing keys: {dropped}"):
        load_adapter_generator(run, "cpu")
    # a training checkpoint whose metadata names a tensor the file does not hold
    ckpt = tmp_path / "last.ckpt"
    save_checkpoint_file({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, ckpt)
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    save_file({}, str(ckpt), metadata=meta)
    with pytest.raises(T2LError, match=r"cannot read checkpoint .*tensor 't0' named in the metadata is missing"):
        load_checkpoint_file(ckpt)


def test_deeply_nested_json_is_one_clear_error(run, tmp_path):
    (run / "hypernet" / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(T2LError, match=r"malformed JSON: nested too deeply"):
        load_adapter_generator(run, "cpu")
    ckpt = tmp_path / "deep.ckpt"
    save_file({}, str(ckpt), metadata={"t2l_checkpoint": '{"__list__":' * 100_000 + "[]" + "}" * 100_000})
    with pytest.raises(T2LError, match=r"nested too deeply"):
        load_checkpoint_file(ckpt)


# --- a run folder's recipe: no values quoted, no interpolations, bounded -------------------------

SECRET = "s3cr3t-t0ken-4a7f"


@pytest.mark.parametrize("text", [
    f"base_model: {SECRET}\n",  # crashed in config._explain with an AttributeError quoting the value
    f"training:\n  lr: {SECRET}\n",
    f"hypernet:\n  head: {SECRET}\n",
    f"base_model:\n  dtype: {SECRET}\n",
    f"encoder:\n  name: {SECRET}\n",
    "lora:\n  rank: 987654321\n",
    f"lora:\n  target_modules: {SECRET}\n",
])
def test_a_recipe_linked_to_another_file_never_has_its_values_quoted(run, tmp_path, capsys, text):
    elsewhere = tmp_path / "not_a_recipe.yaml"
    elsewhere.write_text(text)
    (run / "recipe.yaml").unlink()
    (run / "recipe.yaml").symlink_to(elsewhere)
    with pytest.raises(T2LError) as err:
        load_adapter_generator(run, "cpu")
    message = str(err.value)
    assert "recipe.yaml" in message and SECRET not in message and "987654321" not in message, message
    code, stderr = _generate(capsys, run, tmp_path / "out")
    assert code == 1 and "Traceback" not in stderr and SECRET not in stderr and "987654321" not in stderr, stderr
    code = main(["--debug", "generate", str(run), "a task", "-o", str(tmp_path / "out")])
    stderr = capsys.readouterr().err  # not in a chained exception either
    assert code == 1 and "Traceback" in stderr and SECRET not in stderr and "987654321" not in stderr, stderr


def test_interpolations_in_a_run_folder_are_refused_without_the_flag(world, run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("T2L_TEST_SECRET", SECRET)
    monkeypatch.setenv("T2L_TEST_MODEL", str(world["llm"]))
    for key, value in (("name_or_path", "${oc.env:T2L_TEST_MODEL}"), ("name_or_path", "${oc.env:T2L_TEST_SECRET}")):
        _edit_recipe(run, lambda r: r["base_model"].update({key: value}))
        code, stderr = _generate(capsys, run, tmp_path / "out")
        assert code == 1 and "base_model.name_or_path: interpolations" in stderr and "--trust-remote-code" in stderr
        assert SECRET not in stderr and str(world["llm"]) not in stderr
    _edit_recipe(run, lambda r: (r["base_model"].update(name_or_path=str(world["llm"])),
                                 r["lora"].update(rank="${oc.env:T2L_TEST_SECRET}")))
    code, stderr = _generate(capsys, run, tmp_path / "out")
    assert code == 1 and "lora.rank: interpolations" in stderr and SECRET not in stderr, stderr
    # trusted: resolved once, at load time
    _edit_recipe(run, lambda r: (r["base_model"].update(name_or_path="${oc.env:T2L_TEST_MODEL}"),
                                 r["lora"].update(rank=2)))
    code, stderr = _generate(capsys, run, tmp_path / "out", "--trust-remote-code", "--dtype", "float32")
    assert code == 0, stderr


def test_an_interpolation_that_fails_in_your_own_recipe_is_one_line(world, tmp_path, monkeypatch, capsys):
    """`lora.rank: ${oc.env:VAR}` made `t2l validate` traceback (with the value in it)."""
    monkeypatch.setenv("T2L_TEST_SECRET", SECRET)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(world["recipe"].read_text().replace("  rank: 2\n", "  rank: ${oc.env:T2L_TEST_SECRET}\n"))
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "wrong type for 'lora.rank': expected an integer" in err and "Traceback" not in err
    recipe.write_text(world["recipe"].read_text().replace("  alpha: 4\n", "  alpha: ${lora.rank}\n"))
    assert main(["validate", str(recipe)]) == 0
    assert "alpha: 2" in capsys.readouterr().out  # your own recipe may refer to itself


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\ndata:\n  train_tasks: *a{levels - 1}\n"


def test_nested_yaml_aliases_are_refused_at_once(run, tmp_path, capsys):
    """9 levels x 9 aliases (1.5 kB, 9**9 values) kept validate and generate busy past 18 s."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert len(bomb.read_bytes()) < 1600
    start = time.perf_counter()
    assert main(["validate", str(bomb)]) == 1
    assert "YAML aliases expand this recipe past 10000 values" in capsys.readouterr().err
    shutil.copyfile(bomb, run / "recipe.yaml")
    code, stderr = _generate(capsys, run, tmp_path / "out")
    assert code == 1 and "YAML aliases expand" in stderr
    assert time.perf_counter() - start < 5
    small = tmp_path / "small.yaml"  # aliases themselves are fine
    small.write_text("lora:\n  target_modules: &t [q_proj, v_proj]\ndata:\n  train_tasks: *t\n")
    assert main(["validate", str(small)]) == 0


def test_a_list_of_names_refuses_nested_lists(tmp_path, capsys):
    recipe = tmp_path / "nested.yaml"
    recipe.write_text("data:\n  train_tasks: [[toy_0, toy_1], toy_2]\n")
    assert main(["validate", str(recipe)]) == 1
    assert "data.train_tasks: expected a list of names (strings), not of lists or mappings" in capsys.readouterr().err
