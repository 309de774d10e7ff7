"""examples/factorized_head.py: a research head named by import path in a recipe."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.factorized_head import FactorizedHead
from t2l_framework.assembly import fit, head_lookup
from t2l_framework.config import HypernetConfig, LoraConfig
from t2l_framework.hypernet.heads import PerLayerHead
from t2l_framework.lora.weights import ModuleShapes
from tests.tiny_world import build_world

HEAD = "examples.factorized_head:FactorizedHead"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fewer_parameters_than_per_layer_b_zero_at_init_and_task_dependent_after_a_step():
    from t2l_framework.hypernet.hypernetwork import HyperNetwork

    shapes = ModuleShapes(4, {"q_proj": (64, 64), "v_proj": (64, 32)})
    head, per_layer = FactorizedHead(128, shapes, 4, 64), PerLayerHead(128, shapes, 4, 64)
    assert _params(head) < _params(per_layer) / 4
    torch.manual_seed(0)
    net = HyperNetwork(shapes, 24, HypernetConfig(head=HEAD, latent_size=128),
                       LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]), heads=head_lookup(import_code=True))
    emb = torch.randn(6, 24)
    w = net(emb)
    A, B = w.A["v_proj"], w.B["v_proj"]
    assert A.shape == (6, 4, 4, 64) and B.shape == (6, 4, 32, 4)
    assert torch.all(B == 0) and A.abs().max() <= 1 / 64 ** 0.5 and A.abs().sum() > 0
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):  # zero `up` weights: B moves on step 1, `down` and the trunk from step 2
        opt.zero_grad()
        w = net(emb)
        sum((w.B[m] - torch.ones_like(w.B[m])).pow(2).sum() for m in w.modules).backward()
        opt.step()
    assert all(p.grad.abs().sum() > 0 for p in net.head.down.parameters())
    after = net.eval()(emb).B["v_proj"]
    assert after.std(0).mean() > 0  # B depends on the task, not only on a bias


def test_trains_by_import_path_loss_falls_and_is_smaller(world):
    run = fit(str(world["recipe"]), [f"hypernet.head={HEAD}", "trainer.max_steps=24",
                                     "trainer.val_check_interval=6", "training.run_name=factorized"])
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 4 and val[-1] < val[0] * 0.9, val
    from t2l_framework.hypernet.hypernetwork import HyperNetwork

    net = HyperNetwork.from_pretrained(run / "hypernet", heads=head_lookup(import_code=True))
    assert type(net.head).__name__ == "FactorizedHead"
    per_layer = PerLayerHead(net.head.latent_size, net.shapes, net.rank, net.trunk.width)
    assert _params(net.head) < _params(per_layer)


def test_t2l_validate_imports_it_from_the_python_path_only(world):
    """The current folder is never searched (a downloaded run must not import a module beside it):
    PYTHONPATH names the checkout; --trust-remote-code makes validate import the module too."""
    t2l = Path(sys.executable).with_name("t2l")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [str(t2l), "validate", str(world["recipe"]), f"hypernet.head={HEAD}", "--trust-remote-code"]
    out = subprocess.run(args, cwd=world["root"], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert HEAD in out.stdout
    only_package = world["root"] / "only_package"  # this checkout's t2l_framework without its examples/
    only_package.mkdir(exist_ok=True)
    if not (only_package / "t2l_framework").exists():
        (only_package / "t2l_framework").symlink_to(ROOT / "t2l_framework")
    from_cwd = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                              env={**env, "PYTHONPATH": str(only_package)})
    assert from_cwd.returncode != 0 and "cannot import module 'examples.factorized_head'" in from_cwd.stderr
    assert "the current folder is not searched: PYTHONPATH=. adds it" in from_cwd.stderr
