"""Training modes as objects: the registry is what ``training.mode`` accepts, and a new mode is
one class registered from anywhere (here: this file) that ``t2l fit`` then trains end to end."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from t2l_framework.assembly import fit, load_recipe
from t2l_framework.errors import T2LError
from t2l_framework.training.modes import Trainable, mode_class, mode_for, register, registered_modes, unregister
from t2l_framework.training.modes.instances import InstanceMode
from tests.tiny_world import build_world


class ToyMode(InstanceMode):
    """One shared LoRA trained with an L1 pull of its B factors toward zero; saved as one file."""

    name = "toy_sparse_lora"
    trains = Trainable.ONE_LORA

    def __init__(self, cfg, recipe_file=None):
        super().__init__(cfg, recipe_file)
        self.l1 = 1e-3  # a setting read once

    def trainable(self, datamodule, injection, hypernetwork):
        from t2l_framework.training.module import LearnedLora

        return LearnedLora(injection.shapes, int(self.cfg.lora.rank), float(self.cfg.lora.alpha))

    def adapters(self, module, batch):
        return module.generator()

    def loss(self, module, batch, weights, train):
        ce, logs = self.answer_loss(module, batch, weights, train)
        l1 = torch.stack([b.abs().mean() for b in weights.B.values()]).sum()
        logs["l1"], logs["loss"] = l1, ce + self.l1 * l1
        return logs["loss"], logs

    def save(self, run, pieces, trainer):
        out = run.root / "toy_lora.safetensors"
        w = pieces.trainable().detach()
        save_file({f"{m}.B": b.contiguous() for m, b in w.B.items()}, str(out))
        return out


@pytest.fixture
def toy_mode():
    register(ToyMode)
    try:
        yield ToyMode
    finally:
        unregister(ToyMode.name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("modes_world"))


def test_builtin_modes_are_the_accepted_values():
    assert list(registered_modes()) == ["sft", "recon", "lora", "library"]
    with pytest.raises(T2LError, match=r"training.mode: 'lorra' is not allowed \(did you mean 'lora'\?\); "
                                       r"expected one of: sft, recon, lora, library"):
        load_recipe(overrides=["training.mode=lorra"], check_files=False)
    with pytest.raises(T2LError, match="training.mode: 'lorra' is not allowed"):
        mode_class("lorra")


def test_a_name_is_registered_once():
    class OtherSft(ToyMode):
        name = "sft"

    with pytest.raises(ValueError, match="already registered"):
        register(OtherSft)
    assert mode_class("sft").__name__ == "SftMode"


def test_a_mode_registered_in_a_test_file_trains_end_to_end(world, toy_mode):
    cfg = load_recipe(str(world["recipe"]), [f"training.mode={toy_mode.name}"])
    assert isinstance(mode_for(cfg), ToyMode) and list(registered_modes())[-1] == toy_mode.name
    run = fit(str(world["recipe"]), [f"training.mode={toy_mode.name}", "trainer.max_steps=3",
                                     "training.run_name=toy", "eval.final_report=true"])
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train/l1"]) for r in rows if r.get("train/l1")], "the mode's own loss term is logged"
    saved = load_file(str(run / "toy_lora.safetensors"))
    assert set(saved) == {"q_proj.B", "v_proj.B"} and all(b.abs().sum() > 0 for b in saved.values())
    assert not (run / "report.md").exists()  # end_of_training_table is False: no table though the recipe asks
    status = json.loads((run / "training_status.json").read_text())
    assert (status["mode"], status["steps"], status["examples"]) == (toy_mode.name, 3, 3 * 4 * 2)


def test_an_unregistered_mode_is_refused_again(toy_mode):
    unregister(toy_mode.name)
    with pytest.raises(T2LError, match=f"training.mode: '{toy_mode.name}' is not allowed"):
        load_recipe(overrides=[f"training.mode={toy_mode.name}"], check_files=False)


def test_the_modes_data_paths_are_what_the_recipe_must_give(world):
    with pytest.raises(T2LError, match="data.lora_library: training.mode=recon needs a path here"):
        load_recipe(str(world["recipe"]), ["training.mode=recon"])
    with pytest.raises(T2LError, match="data.instances_file: file or folder"):
        load_recipe(str(world["recipe"]), ["data.instances_file=/nonexistent/instances.jsonl"])
    load_recipe(str(world["recipe"]), ["training.mode=recon", "data.instances_file=/nonexistent/instances.jsonl",
                                       "data.lora_library=/made/by/a/library/run"])  # recon reads no instances
