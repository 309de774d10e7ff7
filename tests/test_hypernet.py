"""HyperNetwork: shapes per head, the reference's init, gradients, custom heads, sizes, checkpoints.

Exact parity of the L / M / S forward with the reference's formulas: tests/test_parity.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from t2l_framework.assembly import head_lookup, load_recipe
from t2l_framework.config import HypernetConfig, LoraConfig
from t2l_framework.errors import T2LError
from t2l_framework.hypernet import HyperNetwork, HypernetHead, PerLayerHead
from t2l_framework.lora.weights import LoraWeights, ModuleShapes
from t2l_framework.runtime import AdapterGenerator

HEADS = ["per_layer", "shared", "chunked", "chunked_learned"]
TINY = ModuleShapes(2, {"q_proj": (32, 32), "v_proj": (32, 16)})
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
ENC_DIM = 24


def tiny_cfg(head: str) -> HypernetConfig:
    """``chunked_learned``: the chunked head with a learned rank embedding instead of rotary."""
    position = "learned" if head == "chunked_learned" else "rotary"
    return HypernetConfig(head=head.replace("_learned", ""), task_dim=8, layer_emb_dim=4, module_emb_dim=4,
                          latent_size=16, n_residual_blocks=2, chunk_position=position)


def tiny(head: str, base_model: str = "tiny-base") -> HyperNetwork:
    torch.manual_seed(0)
    return HyperNetwork(TINY, ENC_DIM, tiny_cfg(head), LORA, base_model=base_model,
                        encoder={"name": "transformers", "model": "tiny-enc", "prefix": "", "normalize": True,
                                 "pooling": "mean"})


class MyHead(PerLayerHead):
    """A user head: the built-in L head with an extra learned output scale."""

    def __init__(self, latent_size, shapes, rank, trunk_width):
        super().__init__(latent_size, shapes, rank, trunk_width)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, features, module, trunk):
        a, b = super().forward(features, module, trunk)
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


def _head_weights_are_zero(net):
    return all(torch.equal(layer.weight, torch.zeros_like(layer.weight)) for layer in net.head.out)


def test_per_layer_init_is_peft_init_for_every_task():
    """Reference L init: zero head weights, bias = PEFT's A init for A and 0 for B."""
    net = tiny("per_layer")
    weights = net(torch.randn(5, ENC_DIM))
    assert _head_weights_are_zero(net)
    for m, (in_f, _) in TINY.shapes.items():
        a, b = weights.A[m], weights.B[m]
        assert torch.equal(b, torch.zeros_like(b))  # the adapted model is the base model at step 0
        assert torch.equal(a, a[:1, :1].expand_as(a))  # same A for every task and layer: the bias
        assert a.abs().max() <= 1 / in_f ** 0.5 and a.std() > 0.3 / in_f ** 0.5  # U(+-1/sqrt(in))
        assert not torch.allclose(a[..., 0, :], a[..., 1, :])


@pytest.mark.parametrize("head", ["shared", "chunked", "chunked_learned"])
def test_shared_bias_heads_start_with_nonzero_b(head):
    """Reference M / S init: one bias shared by A and B, so B = A's first ``out`` columns at
    step 0; M's A is PEFT's init / sqrt(2), S's is one chunk of it / sqrt(2 r) for every rank."""
    net = tiny(head)
    weights = net(torch.randn(3, ENC_DIM))
    assert _head_weights_are_zero(net)
    for m, (in_f, out_f) in TINY.shapes.items():
        a, b = weights.A[m], weights.B[m]
        assert torch.equal(b.transpose(-1, -2), a[..., :out_f]) and b.abs().max() > 0
        bound = 1 / in_f ** 0.5 / 2 ** 0.5 / (1 if head == "shared" else 4 ** 0.5)
        assert a.abs().max() <= bound and a.abs().max() > bound / 2
        ranks_equal = torch.equal(a, a[..., :1, :].expand_as(a))
        assert ranks_equal == (head != "shared")  # S: one bias for all ranks; M: r bias rows


@pytest.mark.parametrize("head", HEADS)
def test_gradients_reach_every_parameter_after_the_first_step(head):
    """Zero head weights block the trunk's gradient at step 0 (as in the reference); one
    optimiser step later every parameter learns."""
    net = tiny(head)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    emb = torch.randn(2, ENC_DIM)

    def loss():
        w = net(emb)
        return sum((w.B[m] * torch.randn_like(w.B[m])).sum() + (w.A[m] * torch.randn_like(w.A[m])).sum()
                   for m in w.modules)

    loss().backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in net.head.out)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.trunk.parameters())
    opt.step()
    opt.zero_grad()
    loss().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient signal reaches {name}"


@pytest.mark.parametrize("head", HEADS)
def test_one_training_step_makes_b_nonzero(head):
    net = tiny(head)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    emb = torch.randn(2, ENC_DIM)
    w = net(emb)
    sum((w.B[m] - 0.1).pow(2).sum() for m in w.modules).backward()
    opt.step()
    after = net.eval()(emb)
    assert all(not torch.equal(after.B[m], w.B[m].detach()) for m in w.modules)
    # ... and B now depends on the task.
    assert all(not torch.allclose(after.B[m][0], after.B[m][1]) for m in w.modules)


def test_trunk_dropout_matches_the_reference_placement():
    """Dropout 0.05 where the reference has it: mixer (3), each residual block (2), mlp3 (1)."""
    from torch import nn

    net = tiny("per_layer")
    kinds = lambda seq: [type(x).__name__ for x in seq]  # noqa: E731
    assert kinds(net.trunk.mixer) == ["Dropout", "Linear", "SiLU", "Dropout", "Linear", "SiLU", "Dropout"]
    for block in net.trunk.blocks:
        assert kinds(block.mlp) == ["LayerNorm", "Linear", "SiLU", "Dropout", "Linear", "SiLU", "Dropout"]
    assert kinds(net.trunk.out) == ["LayerNorm", "Linear", "SiLU", "Dropout", "Linear", "SiLU"]
    assert {m.p for m in net.modules() if isinstance(m, nn.Dropout)} == {0.05}
    emb = torch.randn(2, ENC_DIM)
    with torch.no_grad():
        for p in net.head.parameters():
            p.add_(torch.randn_like(p))
        assert not torch.equal(net.train()(emb).A["q_proj"], net(emb).A["q_proj"])
        assert torch.equal(net.eval()(emb).A["q_proj"], net(emb).A["q_proj"])


def test_trunk_and_head_settings_are_checked():
    with pytest.raises(T2LError, match=r"HypernetConfig: hypernet.n_residual_blocks: expected a positive integer up to 256, got 0"):
        HyperNetwork(TINY, ENC_DIM, HypernetConfig(n_residual_blocks=0), LORA)
    with pytest.raises(T2LError, match=r"hypernet.dropout: expected a number in \[0.0, 1.0\), got 1.5"):
        HyperNetwork(TINY, ENC_DIM, HypernetConfig(dropout=1.5), LORA)
    with pytest.raises(T2LError, match="hypernet.chunk_position: 'sine' is not allowed"):
        HypernetConfig(chunk_position="sine")
    with pytest.raises(T2LError, match="rotary needs an even trunk width"):
        HyperNetwork(TINY, ENC_DIM, HypernetConfig(head="chunked", task_dim=7), LORA)
    with pytest.raises(T2LError, match="hypernet.chunk_position: 'sin' is not allowed"):
        load_recipe(overrides=["hypernet.chunk_position=sin"], check_files=False)


def test_custom_head_by_import_path():
    cfg = tiny_cfg(f"{__name__}:MyHead")
    net = HyperNetwork(TINY, ENC_DIM, cfg, LORA, heads=head_lookup(import_code=True))
    assert type(net.head).__name__ == "MyHead" and isinstance(net.head, HypernetHead)
    assert net(torch.randn(1, ENC_DIM)).A["q_proj"].shape == (1, 2, 4, 32)


def test_import_path_to_non_head_is_refused():
    with pytest.raises(T2LError, match="not a subclass of t2l_framework.HypernetHead"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg(f"{__name__}:NotAHead"), LORA, heads=head_lookup(import_code=True))
    with pytest.raises(T2LError, match="no attribute 'Nope'"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg(f"{__name__}:Nope"), LORA, heads=head_lookup(import_code=True))


def test_unknown_head_name_suggests():
    with pytest.raises(T2LError, match="did you mean 'shared'"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg("sharde"), LORA)  # built-in heads only
    with pytest.raises(T2LError, match="did you mean 'shared'"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg("sharde"), LORA, heads=head_lookup())


def test_without_the_assembly_lookup_only_builtin_heads_resolve():
    with pytest.raises(T2LError, match="unknown head 't2l_framework.hypernet.heads:SharedHead'"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg("t2l_framework.hypernet.heads:SharedHead"), LORA)


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
        net = HyperNetwork(TINY, ENC_DIM, tiny_cfg("my_head"), LORA, heads=head_lookup())
        assert isinstance(net.head, MyHead)
    finally:
        manager.registry(reload=True)


def test_target_modules_must_match_shapes():
    with pytest.raises(T2LError, match="target_modules"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg("shared"), replace(LORA, target_modules=["q_proj", "k_proj"]))


MISTRAL = ModuleShapes(32, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)})


# Reference HyperModulator on Mistral-7B (r=8, q_proj + v_proj, 1024-d gte-large), trainable
# parameters with head biases; the paper rounds them to 55.3M / 34.3M / 4.99M.
MISTRAL_COUNTS = {"per_layer": 55_424_000, "shared": 34_412_288, "chunked": 4_994_816,
                  "chunked_learned": 4_994_816 + 8 * 128 + 2 * 128}


@pytest.mark.parametrize("head", HEADS)
def test_mistral_parameter_counts_are_the_reference_counts(head):
    position = "learned" if head == "chunked_learned" else "rotary"
    with torch.device("meta"):
        net = HyperNetwork(MISTRAL, 1024, HypernetConfig(head=head.replace("_learned", ""), chunk_position=position),
                           LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"]))
    assert net.num_trainable_parameters() == MISTRAL_COUNTS[head]
    assert sum(p.numel() for p in net.trunk.parameters()) == 791_552
    assert net.trunk.width == 128 and net.head.latent_size == 512


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
    assert config["shapes"] == TINY.to_dict() and config["hypernet"]["head"] == head.replace("_learned", "")
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


def test_adapters_from_descriptions_equal_the_forward_on_their_embeddings():
    class FakeEncoder:
        dim = ENC_DIM

        def encode(self, texts):
            return torch.stack([torch.full((ENC_DIM,), float(len(t))) for t in texts])

    net = tiny("shared").eval()
    by_text = AdapterGenerator(net, FakeEncoder()).adapters(["solve math", "translate"])
    with torch.no_grad():
        by_emb = net(FakeEncoder().encode(["solve math", "translate"]))
    assert by_text.batch_size == 2 and torch.equal(by_text.A["q_proj"], by_emb.A["q_proj"])
    with pytest.raises(T2LError, match="non-empty"):
        AdapterGenerator(net, FakeEncoder()).adapters(["x", " "])


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
        NoForward(8, TINY, 2, 16)


def test_one_config_type_goes_in_and_a_recipe_is_converted_at_the_edge():
    with pytest.raises(TypeError, match="hypernet_cfg must be a HypernetConfig, not dict"):
        HyperNetwork(TINY, ENC_DIM, {"head": "per_layer"}, LORA)
    with pytest.raises(TypeError, match="lora_cfg must be a LoraConfig, not dict"):
        HyperNetwork(TINY, ENC_DIM, tiny_cfg("shared"), {"rank": 4})
    cfg = load_recipe(overrides=["hypernet.head=shared", "hypernet.latent_size=16", "lora.rank=4",
                                 "lora.alpha=8.0"], check_files=False)
    net = HyperNetwork.from_recipe(cfg, TINY, ENC_DIM)
    assert net.head_name == "shared" and net.rank == 4 and net.hypernet_cfg["latent_size"] == 16
