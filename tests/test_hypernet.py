"""HyperNetwork: shapes per head, PEFT-like init, gradients, custom heads, sizes, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from t2l_framework.config import HypernetConfig, load_recipe
from t2l_framework.errors import T2LError
from t2l_framework.hypernet import HyperNetwork, HypernetHead, PerLayerHead
from t2l_framework.lora.weights import LoraWeights, ModuleShapes

HEADS = ["per_layer", "shared", "chunked"]
TINY = ModuleShapes(2, {"q_proj": (32, 32), "v_proj": (32, 16)})
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
ENC_DIM = 24


def tiny_cfg(head: str) -> HypernetConfig:
    return HypernetConfig(head=head, task_dim=8, layer_emb_dim=4, module_emb_dim=4, latent_size=16,
                          n_residual_blocks=2)


def tiny(head: str, base_model: str = "tiny-base") -> HyperNetwork:
    torch.manual_seed(0)
    return HyperNetwork(TINY, ENC_DIM, tiny_cfg(head), LORA, base_model=base_model,
                        encoder={"name": "transformers", "model": "tiny-enc", "prefix": "", "normalize": True,
                                 "pooling": "mean"})


class MyHead(PerLayerHead):
    """A user head: the built-in L head with an extra learned output scale."""

    def __init__(self, latent_size, shapes, rank):
        super().__init__(latent_size, shapes, rank)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, features, module):
        a, b = super().forward(features, module)
        return a * self.scale, b * self.scale


class NotAHead(torch.nn.Module):
    pass


@pytest.mark.parametrize("head", HEADS)
def test_shapes_and_dtypes(head):
    weights = tiny(head)(torch.randn(3, ENC_DIM))
    assert isinstance(weights, LoraWeights) and weights.rank == 4 and weights.alpha == 8.0
    for m, (in_f, out_f) in TINY.shapes.items():
        assert weights.A[m].shape == (3, 2, 4, in_f)
        assert weights.B[m].shape == (3, 2, out_f, 4)
        assert weights.A[m].dtype == weights.B[m].dtype == torch.float32


@pytest.mark.parametrize("head", HEADS)
def test_init_matches_peft_default(head):
    net = tiny(head)
    weights = net(torch.randn(5, ENC_DIM))
    for m, (in_f, _) in TINY.shapes.items():
        assert torch.equal(weights.B[m], torch.zeros_like(weights.B[m]))
        delta = weights.B[m] @ weights.A[m]  # [batch, layers, out, in]
        assert torch.equal(delta, torch.zeros_like(delta))
        a = weights.A[m]
        # PEFT's kaiming-uniform A: nonzero, within about 1/sqrt(in), rows differ across rank.
        assert a.abs().min() >= 0 and a.std() > 0.1 / in_f ** 0.5
        assert a.abs().max() < 1.5 / in_f ** 0.5
        assert not torch.allclose(a[:, :, 0], a[:, :, 1])


@pytest.mark.parametrize("head", HEADS)
def test_gradients_reach_every_parameter(head):
    net = tiny(head)
    weights = net(torch.randn(2, ENC_DIM))
    # A loss through delta W alone has zero gradient w.r.t. A at init (B == 0), as in PEFT; the
    # training loss also carries an L2 penalty on the generated weights, which reaches A.
    loss = sum((w.B[m] * torch.randn_like(w.B[m])).sum() + 1e-3 * w.A[m].pow(2).sum()
               for w in [weights] for m in w.modules)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for name, p in net.trunk.named_parameters():
        assert p.grad.abs().sum() > 0, f"no gradient signal reaches trunk parameter {name}"


@pytest.mark.parametrize("head", HEADS)
def test_one_training_step_makes_b_nonzero(head):
    net = tiny(head)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    emb = torch.randn(2, ENC_DIM)
    w = net(emb)
    sum((w.B[m] - 0.1).pow(2).sum() for m in w.modules).backward()
    opt.step()
    assert all(net(emb).B[m].abs().max() > 0 for m in w.modules)


def test_custom_head_by_import_path():
    cfg = tiny_cfg(f"{__name__}:MyHead")
    net = HyperNetwork(TINY, ENC_DIM, cfg, LORA)
    assert type(net.head).__name__ == "MyHead" and isinstance(net.head, HypernetHead)
    assert net(torch.randn(1, ENC_DIM)).A["q_proj"].shape == (1, 2, 4, 32)


def test_import_path_to_non_head_is_refused():
    with pytest.raises(T2LError, match="not a subclass of t2l_framework.HypernetHead"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg(f"{__name__}:NotAHead"), LORA)
    with pytest.raises(T2LError, match="no attribute 'Nope'"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg(f"{__name__}:Nope"), LORA)


def test_unknown_head_name_suggests():
    with pytest.raises(T2LError, match="did you mean 'shared'"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg("sharde"), LORA)


def test_custom_head_through_a_plugin(monkeypatch):
    from t2l_framework.plugins import hookimpl, manager

    class Plugin:
        @staticmethod
        @hookimpl
        def t2l_register_heads(register):
            register("my_head", MyHead)

    class FakeEntryPoint:
        name, value, dist = "my-plugin", f"{__name__}:Plugin", None

        def load(self):
            return Plugin

    monkeypatch.setattr(manager, "_entry_points", lambda: [FakeEntryPoint()])
    monkeypatch.setattr(manager, "_REGISTRY", None)
    try:
        assert manager.registry().owners["heads"]["my_head"] == "my-plugin"
        net = HyperNetwork(TINY, ENC_DIM, tiny_cfg("my_head"), LORA)
        assert isinstance(net.head, MyHead)
    finally:
        manager.registry(reload=True)


def test_target_modules_must_match_shapes():
    with pytest.raises(T2LError, match="target_modules"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg("shared"), {**LORA, "target_modules": ["q_proj", "k_proj"]})


MISTRAL = ModuleShapes(32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)})


@pytest.mark.parametrize("head,paper_millions", [("per_layer", 55.3), ("shared", 34.3), ("chunked", 4.99)])
def test_mistral_parameter_counts_match_paper(head, paper_millions):
    with torch.device("meta"):
        net = HyperNetwork(MISTRAL, 1024, HypernetConfig(head=head),
                           {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]})
    n = net.num_trainable_parameters() / 1e6
    assert abs(n - paper_millions) / paper_millions < 0.03, f"{head}: {n:.2f}M vs paper {paper_millions}M"


def test_from_recipe_records_metadata():
    recipe = load_recipe(overrides=["hypernet.head=chunked", "hypernet.latent_size=16", "lora.rank=4"],
                         check_files=False)
    net = HyperNetwork.from_recipe(recipe, TINY, ENC_DIM)
    meta = net.metadata
    assert meta["head"] == "chunked" and meta["rank"] == 4 and meta["target_modules"] == ["q_proj", "v_proj"]
    assert meta["base_model"] == recipe.base_model.name_or_path and meta["encoder"]["model"] == recipe.encoder.model


@pytest.mark.parametrize("head", HEADS)
def test_save_load_round_trip(tmp_path, head):
    net = tiny(head)
    with torch.no_grad():  # move B off zero so the comparison covers it
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["hypernet.safetensors", "hypernet_config.json"]
    config = json.loads((tmp_path / "hypernet_config.json").read_text())
    assert config["base_model"] == "tiny-base" and config["lora"]["rank"] == 4
    assert config["shapes"] == TINY.to_dict() and config["hypernet"]["head"] == head
    assert config["encoder"]["model"] == "tiny-enc"
    loaded = HyperNetwork.from_pretrained(tmp_path, expect_base_model="tiny-base", expect_rank=4)
    emb = torch.randn(3, ENC_DIM)
    net.eval()
    a, b = net(emb), loaded(emb)
    for m in TINY.modules:
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m])
        assert b.B[m].abs().max() > 0


def test_checkpoint_for_another_model_or_rank_is_refused(tmp_path):
    tiny("shared", base_model="org/Tiny-Base").save_pretrained(tmp_path)
    with pytest.raises(T2LError, match="trained for base model 'org/Tiny-Base', not 'other/model'"):
        HyperNetwork.from_pretrained(tmp_path, expect_base_model="other/model")
    with pytest.raises(T2LError, match="rank-4 LoRAs, not rank 8"):
        HyperNetwork.from_pretrained(tmp_path, expect_rank=8)
    # A local copy of the same model is the same base model.
    HyperNetwork.from_pretrained(tmp_path, expect_base_model="/models/Tiny-Base")


def test_weights_with_wrong_keys_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny("per_layer").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "hypernet.safetensors"))
    key = sorted(state)[0]
    state["extra.weight"] = state.pop(key)
    save_file(state, str(tmp_path / "hypernet.safetensors"))
    with pytest.raises(T2LError, match=f"missing keys: {key}.*unexpected keys: extra.weight"):
        HyperNetwork.from_pretrained(tmp_path)
    tiny("per_layer").save_pretrained(tmp_path / "ok")
    other = HyperNetwork(ModuleShapes(2, {"q_proj": (32, 32), "v_proj": (32, 8)}), ENC_DIM,
                         tiny_cfg("per_layer"), LORA)
    with pytest.raises(T2LError, match="wrong shapes"):
        other.load_weights(tmp_path / "ok" / "hypernet.safetensors")
    with pytest.raises(T2LError, match="no hypernet_config.json"):
        HyperNetwork.from_pretrained(tmp_path / "nowhere")


def test_generate_from_descriptions_and_embeddings():
    class FakeEncoder:
        dim = ENC_DIM

        def encode(self, texts):
            return torch.stack([torch.full((ENC_DIM,), float(len(t))) for t in texts])

    net = tiny("shared").eval()
    by_text = net.generate(["solve math", "translate"], FakeEncoder())
    by_emb = net.generate(FakeEncoder().encode(["solve math", "translate"]))
    assert by_text.batch_size == 2 and torch.equal(by_text.A["q_proj"], by_emb.A["q_proj"])
    with pytest.raises(T2LError, match="no encoder"):
        net.generate(["x"])


@pytest.mark.parametrize("head", HEADS)
def test_samples_do_not_mix_in_a_batch(head):
    net = tiny(head).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    emb = torch.randn(3, ENC_DIM)
    together, alone = net(emb), net(emb[1:2])
    for m in TINY.modules:
        torch.testing.assert_close(together.A[m][1:2], alone.A[m])
        torch.testing.assert_close(together.B[m][1:2], alone.B[m])
    assert not torch.allclose(together.B["q_proj"][0], together.B["q_proj"][1])


def test_forward_is_one_trunk_pass_per_batch():
    net = tiny("per_layer")
    calls = []
    net.trunk.register_forward_hook(lambda *a: calls.append(1))
    net(torch.randn(4, ENC_DIM))
    assert calls == [1]


def test_a_head_without_forward_cannot_be_built():
    from t2l_framework import HypernetHead

    class NoForward(HypernetHead):
        pass

    with pytest.raises(TypeError, match="abstract method forward"):
        NoForward(8, TINY, 2)
