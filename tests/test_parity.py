"""Parity with the T2L reference (SakanaAI/text-to-lora @ 8ba7749) through `t2l import-reference`.

``reference_lora`` below re-states the reference's ``HyperModulator`` forward
(``_hypernet_forward`` + ``get_delta_weights`` + ``gen_lora``) straight from its code: one
module type at a time, the layers of one task as the batch, weights read from a
reference-format state dict, rotary from transformers' Llama rotary as the reference uses it,
and the reference's output buffers applied as ``get_delta_weights`` and ``convert_to_raw_scale``
apply them (z-scores x (std + 1e-10) + mean, + AB_offset). It shares no code with the
framework's hypernetwork. Every weight is random (head weights
included), so a wrong mapping, layout or formula cannot hide behind an init.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from t2l_framework.cli import main
from t2l_framework.errors import T2LError
from t2l_framework.hypernet import HyperNetwork
from t2l_framework.hypernet.reference_import import BUFFERS, convert, import_reference, read_reference

# Small shapes; up_proj has out > in, so both slicing directions of M and S are covered.
SHAPES = {"q_proj": (16, 16), "v_proj": (16, 8), "up_proj": (16, 24)}
ORDER = ["v_proj", "q_proj", "up_proj"]  # adapter_config.json order = the reference's embedding rows
N_LAYERS, RANK, ENC, LATENT, HEAD_IN = 3, 4, 12, 16, 20
KINDS = {"L": dict(), "M": dict(shared_AB_head=True),
         "S": dict(shared_AB_head=True, autoreg_gen=True),
         "S_learned": dict(shared_AB_head=True, autoreg_gen=True, learnable_pos_emb=True)}


# --- the reference, re-stated --------------------------------------------------------------

def reference_state(kind: str, shapes=SHAPES, order=ORDER, n_layers=N_LAYERS, rank=RANK, enc=ENC,
                    latent=LATENT, head_in=HEAD_IN, seed=0, head_bias=True,
                    buffers=()) -> dict[str, torch.Tensor]:
    """A HyperModulator state dict (key names and shapes as the reference module registers
    them) with random values; AB_offset / recon buffers are zeros as in a plain SFT run, except
    those named in ``buffers`` (random; std_recon_target positive, with one exact zero).
    head_bias: the reference's ``head_use_bias`` (false with mt_lora_path or pred_z_score)."""
    g = torch.Generator().manual_seed(seed)
    flags = KINDS[kind]
    t, d = latent // 2, latent // 4
    spec = {"task_encoder.mlp.0.weight": (t, enc), "task_encoder.mlp.0.bias": (t,),
            "task_encoder.mlp.1.weight": (t,), "task_encoder.mlp.1.bias": (t,),
            "layer_depth_encoder.0.weight": (n_layers, d), "layer_depth_encoder.1.weight": (d,),
            "layer_depth_encoder.1.bias": (d,), "layer_type_encoder.0.weight": (len(order), d),
            "layer_type_encoder.1.weight": (d,), "layer_type_encoder.1.bias": (d,),
            "mixer.1.weight": (4 * latent, latent), "mixer.1.bias": (4 * latent,),
            "mixer.4.weight": (latent, 4 * latent), "mixer.4.bias": (latent,),
            "mlp3.0.weight": (latent,), "mlp3.0.bias": (latent,), "mlp3.1.weight": (4 * latent, latent),
            "mlp3.1.bias": (4 * latent,), "mlp3.4.weight": (head_in, 4 * latent), "mlp3.4.bias": (head_in,)}
    for block in ("mlp1", "mlp2"):
        spec |= {f"{block}.mlp.0.weight": (latent,), f"{block}.mlp.0.bias": (latent,),
                 f"{block}.mlp.1.weight": (4 * latent, latent), f"{block}.mlp.1.bias": (4 * latent,),
                 f"{block}.mlp.4.weight": (latent, 4 * latent), f"{block}.mlp.4.bias": (latent,)}
    for m in order:
        i, o = shapes[m]
        if not flags.get("shared_AB_head"):
            size = rank * (i + o)
        else:
            size = max(i, o) if flags.get("autoreg_gen") else rank * max(i, o)
        spec |= {f"heads.{m}.weight": (size, head_in)} | ({f"heads.{m}.bias": (size,)} if head_bias else {})
        if flags.get("shared_AB_head"):
            spec |= {f"out_emb.{m}.A": (latent,), f"out_emb.{m}.B": (latent,)}
    if flags.get("shared_AB_head"):
        spec |= {"out_emb_norm.weight": (latent,), "out_emb_norm.bias": (latent,)}
    if flags.get("learnable_pos_emb"):
        spec |= {"pos_emb.0.weight": (rank, latent), "pos_emb.1.weight": (latent,), "pos_emb.1.bias": (latent,)}
    state = {k: torch.randn(s, generator=g) / math.sqrt(s[-1]) * (1.0 if len(s) > 1 else 3.0) for k, s in spec.items()}
    for buffer in ("AB_offset", "mean_recon_target", "std_recon_target"):
        for m in order:
            i, o = shapes[m]
            for ab, shape in (("A", (n_layers, rank, i)), ("B", (n_layers, o, rank))):
                value = torch.zeros(shape)
                if buffer in buffers:
                    value = torch.randn(shape, generator=g)
                    if buffer == "std_recon_target":
                        value = value.abs() + 0.1
                        value[0, 0, 0] = 0.0  # z x (0 + 1e-10) + mean: where the epsilon goes matters
                state[f"{buffer}.{ab}.{m}"] = value
    return state


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))  # heads may have no bias


def _ln(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def _block(sd, name, x):
    """MLPResidualBlock(pre_layer_norm, post_dropout) in eval mode."""
    h = F.silu(_linear(sd, f"{name}.mlp.1", _ln(sd, f"{name}.mlp.0", x)))
    return x + F.silu(_linear(sd, f"{name}.mlp.4", h))


def _mlp3(sd, x):
    return F.silu(_linear(sd, "mlp3.4", F.silu(_linear(sd, "mlp3.1", _ln(sd, "mlp3.0", x)))))


def _rotary(x, r):
    """The reference's rotary: transformers' LlamaRotaryEmbedding(dim=width, base 10000) over rank positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=x.shape[-1], num_attention_heads=1, max_position_embeddings=64))
    cos, sin = rot(x, torch.arange(r).unsqueeze(0))  # [1, r, width]
    return x * cos + rotate_half(x) * sin


def reference_lora(sd, flags, shapes, order, rank, task_emb, args=None):
    """gen_lora for ONE task embedding [1, enc] -> {module: (A [layers, r, in], B [layers, out, r])}.

    args: the args.yaml settings that decide the output (training_task, factorized,
    pred_z_score, delta_w_scaling, the reference's defaults when absent)."""
    args = {"training_task": "sft", "factorized": False, "pred_z_score": True, "delta_w_scaling": 10000,
            **(args or {})}
    n_layers = sd["layer_depth_encoder.0.weight"].shape[0]
    layer_indices = torch.arange(n_layers)
    encoded = _ln(sd, "task_encoder.mlp.1", _linear(sd, "task_encoder.mlp.0", task_emb))
    encoded = encoded.expand(n_layers, -1)  # gen_lora: encoded_task_emb.expand(len(layer_indices), -1)
    module_to_int = {m: i for i, m in enumerate(order)}
    out = {}
    for layer_type in order:
        in_f, out_f = shapes[layer_type]
        bs = n_layers
        depth = _ln(sd, "layer_depth_encoder.1", F.embedding(layer_indices, sd["layer_depth_encoder.0.weight"]))
        type_emb = _ln(sd, "layer_type_encoder.1", F.embedding(torch.tensor([module_to_int[layer_type]]),
                                                               sd["layer_type_encoder.0.weight"])).expand(bs, -1)
        x = torch.cat([encoded, depth, type_emb], dim=-1)
        x = F.silu(_linear(sd, "mixer.4", F.silu(_linear(sd, "mixer.1", x))))
        mlp_out = _block(sd, "mlp1", x)
        head = lambda h: _linear(sd, f"heads.{layer_type}", h)  # noqa: E731
        if not flags.get("shared_AB_head"):
            head_out = head(_mlp3(sd, _block(sd, "mlp2", mlp_out)))
            A, B = torch.split(head_out, [rank * in_f, rank * out_f], dim=-1)
        else:
            parts = []
            for ab, n in (("A", in_f), ("B", out_f)):
                head_in = _block(sd, "mlp2", mlp_out + _ln(sd, "out_emb_norm", sd[f"out_emb.{layer_type}.{ab}"]))
                if not flags.get("autoreg_gen"):
                    head_out = head(_mlp3(sd, head_in)).view(bs, rank, -1)[..., :n].reshape(bs, rank * n)
                else:
                    head_in = head_in.unsqueeze(1).expand(-1, rank, -1)
                    if flags.get("learnable_pos_emb"):
                        pos = _ln(sd, "pos_emb.1", F.embedding(torch.arange(rank), sd["pos_emb.0.weight"])).unsqueeze(0)
                        head_in = head_in + _block(sd, "mlp2", pos)
                    else:
                        head_in = _block(sd, "mlp2", _rotary(head_in, rank))
                    head_out = head(_mlp3(sd, head_in))[..., :n].reshape(bs, rank * n)
                parts.append(head_out)
            A, B = parts
        A = A.reshape(bs, rank, in_f)
        B = B.reshape(bs, rank, out_f).transpose(-1, -2)
        if args["training_task"] == "sft":  # get_delta_weights
            A = A + sd[f"AB_offset.A.{layer_type}"][layer_indices]
            B = B + sd[f"AB_offset.B.{layer_type}"][layer_indices]
        out[layer_type] = (A, B)
    if args["training_task"] == "recon":  # gen_lora -> convert_to_raw_scale
        for layer_type, AB in out.items():
            AB = list(AB)
            for j, ab in enumerate("AB"):
                if args["factorized"]:
                    if args["pred_z_score"]:
                        AB[j] = (AB[j] * (sd[f"std_recon_target.{ab}.{layer_type}"] + 1e-10)
                                 + sd[f"mean_recon_target.{ab}.{layer_type}"])
                    AB[j] = AB[j] + sd[f"AB_offset.{ab}.{layer_type}"]  # `if self.AB_offset:` always holds
                else:
                    if args["pred_z_score"]:
                        raise NotImplementedError("pred_z_score not implemented for non-factorized LORA")
                    AB[j] = AB[j] / math.sqrt(args["delta_w_scaling"])
            out[layer_type] = tuple(AB)
    return out


def write_reference(folder: Path, state, kind="L", order=ORDER, rank=RANK, args=None, adapter=None) -> Path:
    """A reference checkpoint folder as its training scripts write it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "hypermod.pt")
    base = {"exp_setup": "hyper_lora", "training_task": "sft", "model_dir": "mistralai/Mistral-7B-Instruct-v0.2",
            "emb_model": "Alibaba-NLP/gte-large-en-v1.5", "encoder_type": "linear", "use_one_hot_task_emb": False,
            "shared_AB_head": False, "autoreg_gen": False, "learnable_pos_emb": False, "learnable_AB_offset": False,
            "mt_lora_path": None, "pred_z_score": True, "hypernet_latent_size": LATENT, "head_in_size": HEAD_IN,
            "target_modules": sorted(order), "lr": 2.5e-5}
    (folder / "args.yaml").write_text(yaml.safe_dump({**base, **KINDS[kind], **(args or {})}))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": True, "lora_dropout": 0.05,
              "target_modules": list(order), "base_model_name_or_path": base["model_dir"], "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps({**config, **(adapter or {})}))
    return folder


# --- parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_imported_hypernetwork_reproduces_the_reference(tmp_path, kind):
    state = reference_state(kind)
    run = import_reference(write_reference(tmp_path / "ref", state, kind), tmp_path / "run")
    net = HyperNetwork.from_pretrained(run / "hypernet").eval()
    assert net.head_name == {"L": "per_layer", "M": "shared"}.get(kind, "chunked")
    assert net.target_modules == ORDER and net.use_rslora and net.rank == RANK and net.alpha == 2 * RANK
    emb = torch.randn(2, ENC, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        ours = net(emb)  # one batched forward for both tasks
        for row in range(2):
            ref = reference_lora(state, KINDS[kind], SHAPES, ORDER, RANK, emb[row:row + 1])
            for m, (A, B) in ref.items():
                assert (ours.A[m][row] - A).abs().max() <= 1e-5, (m, "A")
                assert (ours.B[m][row] - B).abs().max() <= 1e-5, (m, "B")
    # The comparison has teeth: outputs depend on the task, and B is far from zero.
    for m in SHAPES:
        assert (ours.A[m][0] - ours.A[m][1]).abs().max() > 1e-2 and ours.B[m].abs().max() > 1e-2


# Reference set-ups whose output goes through its buffers: args.yaml, the reference's
# head_use_bias for it (create_hypermod), the buffers that hold random non-zero values.
OUTPUT_SETUPS = {
    "z_score": ({"training_task": "recon", "factorized": True, "pred_z_score": True}, False,
                ("mean_recon_target", "std_recon_target")),
    "mt_lora": ({"mt_lora_path": "loras/mt"}, False, ("AB_offset",)),
    # convert_to_raw_scale adds AB_offset after un-standardising (zeros from the reference's own training)
    "z_score_and_offset": ({"training_task": "recon", "factorized": True, "pred_z_score": True}, False, BUFFERS),
}


@pytest.mark.parametrize("setup", list(OUTPUT_SETUPS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_output_buffers_reproduce_the_reference(tmp_path, kind, setup):
    """A z-scored reconstruction model (A = z x (std + 1e-10) + mean) and a multi-task-LoRA
    offset model (A = head + AB_offset) give the reference's A and B, and reload as imported."""
    args, head_bias, buffers = OUTPUT_SETUPS[setup]
    state = reference_state(kind, head_bias=head_bias, buffers=buffers)
    folder = write_reference(tmp_path / "ref", state, kind, args=args)
    run = import_reference(folder, tmp_path / "run")
    net = HyperNetwork.from_pretrained(run / "hypernet").eval()
    z_scores = "std_recon_target" in buffers
    assert (net.output_scale is not None, net.output_offset is not None) == (z_scores, True)
    saved = json.loads((run / "hypernet" / "hypernet_config.json").read_text())["hypernet"]
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())["hypernet"]
    assert saved["output_scale"] is recipe["output_scale"] is z_scores
    assert saved["output_offset"] is recipe["output_offset"] is True
    record = json.loads((run / "reference" / "import.json").read_text())
    assert (record["output_scale"], record["output_offset"]) == (
        ("std_recon_target + 1e-10", "mean_recon_target + AB_offset") if z_scores else (None, "AB_offset"))
    if z_scores:  # the reference adds 1e-10 to std when it un-standardises; ours holds std + 1e-10
        i = net.shapes.modules.index("v_proj")
        assert getattr(net.output_scale, f"A{i}")[0, 0, 0] == torch.tensor(1e-10)
    emb = torch.randn(2, ENC, generator=torch.Generator().manual_seed(1)) * 3
    sd64 = {k: v.double() for k, v in state.items()}
    no_buffers = {k: v * 0 if k.split(".")[0] in BUFFERS else v for k, v in sd64.items()}
    with torch.no_grad():
        ours = net(emb)
        ours64 = copy.deepcopy(net).double()(emb.double())
        for row in range(2):
            ref = reference_lora(sd64, KINDS[kind], SHAPES, ORDER, RANK, emb[row:row + 1].double(), args)
            plain = reference_lora(no_buffers, KINDS[kind], SHAPES, ORDER, RANK, emb[row:row + 1].double(), args)
            for m, (A, B) in ref.items():
                assert (ours64.A[m][row] - A).abs().max() <= 1e-6 and (ours64.B[m][row] - B).abs().max() <= 1e-6, m
                assert (ours.A[m][row] - A).abs().max() <= 1e-5 and (ours.B[m][row] - B).abs().max() <= 1e-5, m
                # The buffers change the output, so the match means they are applied as the reference does.
                assert (A - plain[m][0]).abs().max() > 1e-2 and (B - plain[m][1]).abs().max() > 1e-2, m
        # The run folder reloads as the network the importer built.
        built, _ = convert(read_reference(folder))
        again = built(emb)
        for m in SHAPES:
            assert torch.equal(again.A[m], ours.A[m]) and torch.equal(again.B[m], ours.B[m]), m
    for m in SHAPES:
        assert (ours.A[m][0] - ours.A[m][1]).abs().max() > 1e-2


def test_raw_scale_reconstruction_model_with_pred_z_score_ignores_its_statistics(tmp_path):
    """The README's reconstruction run (factorized=False, pred_z_score=True): create_hypermod
    fills mean/std_recon_target and drops the heads' bias, but its loss (B A against
    delta_w_scaling x the target) never reads the statistics, and convert_to_raw_scale raises
    NotImplementedError rather than generate. Imported as it was trained: raw heads / 100."""
    args = {"training_task": "recon", "pred_z_score": True, "factorized": False, "delta_w_scaling": 10000}
    state = reference_state("M", head_bias=False, buffers=("mean_recon_target", "std_recon_target"))
    run = import_reference(write_reference(tmp_path / "ref", state, "M", args=args), tmp_path / "run")
    net = HyperNetwork.from_pretrained(run / "hypernet").eval()
    assert net.output_scale is None and net.output_offset is None
    emb = torch.randn(1, ENC)
    with pytest.raises(NotImplementedError):
        reference_lora(state, KINDS["M"], SHAPES, ORDER, RANK, emb, args)
    with torch.no_grad():
        ours = net(emb)
    for m, (A, B) in reference_lora(state, KINDS["M"], SHAPES, ORDER, RANK, emb, {**args, "pred_z_score": False}).items():
        assert (ours.A[m][0] - A).abs().max() <= 1e-6 and (ours.B[m][0] - B).abs().max() <= 1e-6


def test_param_count_of_imported_run_equals_the_reference_state_dict(tmp_path):
    """Trainable parameters = the reference's tensors minus its three buffers, plus the zero
    biases that its bias-free heads get here, for every head; the buffers it applies come as
    output buffers of their size (the offset holds mean + AB_offset when both apply)."""
    copies = {None: 0, "mt_lora": 1, "z_score": 2, "z_score_and_offset": 2}  # offset; scale and offset
    for kind in KINDS:
        for setup in (None, *OUTPUT_SETUPS):
            args, head_bias, buffers = OUTPUT_SETUPS.get(setup, ({}, True, ()))
            state = reference_state(kind, head_bias=head_bias, buffers=buffers)
            folder = write_reference(tmp_path / f"{kind}_{setup}", state, kind, args=args)
            net = HyperNetwork.from_pretrained(import_reference(folder, tmp_path / f"run_{kind}_{setup}") / "hypernet")
            n_ref = sum(v.numel() for k, v in state.items() if k.split(".")[0] not in BUFFERS)
            zero_biases = 0 if head_bias else sum(state[f"heads.{m}.weight"].shape[0] for m in ORDER)
            assert net.num_trainable_parameters() == n_ref + zero_biases, (kind, setup)
            one_buffer = sum(state[f"AB_offset.{ab}.{m}"].numel() for ab in "AB" for m in ORDER)
            n_out = sum(b.numel() for name, b in net.named_buffers() if name.startswith(("output_", )))
            assert n_out == copies[setup] * one_buffer, (kind, setup)


def test_module_order_decides_which_embedding_row_is_which(tmp_path):
    state = reference_state("L")
    folder = write_reference(tmp_path / "ref", state)
    emb = torch.randn(1, ENC)
    swapped = ["q_proj", "v_proj", "up_proj"]
    run = import_reference(folder, tmp_path / "run", module_order=swapped)
    assert json.loads((run / "reference" / "import.json").read_text())["module_order"] == swapped
    net = HyperNetwork.from_pretrained(run / "hypernet").eval()
    with torch.no_grad():
        ours = net(emb)
    trained_with_swapped = reference_lora(state, {}, SHAPES, swapped, RANK, emb)
    trained_with_default = reference_lora(state, {}, SHAPES, ORDER, RANK, emb)
    assert (ours.A["q_proj"][0] - trained_with_swapped["q_proj"][0]).abs().max() <= 1e-5
    assert (ours.A["q_proj"][0] - trained_with_default["q_proj"][0]).abs().max() > 1e-3


def test_raw_scale_reconstruction_model_folds_its_output_scale(tmp_path):
    state = reference_state("M")
    args = {"training_task": "recon", "pred_z_score": False, "factorized": False, "delta_w_scaling": 10000}
    run = import_reference(write_reference(tmp_path / "ref", state, "M", args=args), tmp_path / "run")
    emb = torch.randn(1, ENC)
    with torch.no_grad():
        ours = HyperNetwork.from_pretrained(run / "hypernet").eval()(emb)
    raw = reference_lora(state, KINDS["M"], SHAPES, ORDER, RANK, emb)  # the heads' own output
    for m, (A, B) in reference_lora(state, KINDS["M"], SHAPES, ORDER, RANK, emb, args).items():
        # gen_lora -> convert_to_raw_scale divides A and B by sqrt(delta_w_scaling).
        assert (A - raw[m][0] / 100).abs().max() <= 1e-7 and (B - raw[m][1] / 100).abs().max() <= 1e-7
        assert (ours.A[m][0] - A).abs().max() <= 1e-6 and (ours.B[m][0] - B).abs().max() <= 1e-6


def test_run_folder_layout_and_recipe(tmp_path):
    run = import_reference(write_reference(tmp_path / "ref", reference_state("S"), "S"), tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == ["hypernet", "recipe.yaml", "reference"]
    assert sorted(p.name for p in (run / "reference").iterdir()) == ["adapter_config.json", "args.yaml", "import.json"]
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["base_model"]["name_or_path"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert recipe["encoder"].items() >= {"model": "Alibaba-NLP/gte-large-en-v1.5", "pooling": "cls",
                                         "trust_remote_code": True, "name": "transformers"}.items()
    assert recipe["hypernet"].items() >= {"head": "chunked", "chunk_position": "rotary", "task_dim": 8,
                                          "layer_emb_dim": 4, "module_emb_dim": 4, "latent_size": HEAD_IN}.items()
    assert (recipe["lora"]["rank"], recipe["lora"]["alpha"], recipe["lora"]["use_rslora"],
            recipe["lora"]["target_modules"]) == (RANK, 2.0 * RANK, True, ORDER)
    config = json.loads((run / "hypernet" / "hypernet_config.json").read_text())
    assert config["encoder"]["model"] == "Alibaba-NLP/gte-large-en-v1.5"
    assert config["shapes"]["n_layers"] == N_LAYERS and config["shapes"]["shapes"]["up_proj"] == [16, 24]


# --- the imported run through PEFT and the CLI ---------------------------------------------

def test_peft_export_of_an_imported_adapter_gives_our_logits(tiny_llama, tmp_path):
    from peft import PeftModel

    from t2l_framework.lora.batched import inject_lora
    from t2l_framework.lora.peft_io import export_peft_adapter

    model = tiny_llama()
    shapes = {"q_proj": (64, 64), "v_proj": (64, 32)}
    state = reference_state("M", shapes=shapes, order=["q_proj", "v_proj"], n_layers=2)
    folder = write_reference(tmp_path / "ref", state, "M", order=["q_proj", "v_proj"])
    run = import_reference(folder, tmp_path / "run")
    net = HyperNetwork.from_pretrained(run / "hypernet").eval()
    with torch.no_grad():
        weights = net(torch.randn(1, ENC))
    injection = inject_lora(copy.deepcopy(model), net.target_modules)
    out = export_peft_adapter(weights, tmp_path / "adapter", "tiny", paths=injection.paths)
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    x = torch.randint(3, 128, (2, 12))
    with torch.no_grad(), injection.use(weights):
        ours = injection.model(x).logits
        theirs = peft_model(x).logits
        base = model(x).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the model, so the match means something


@pytest.mark.dtype_sensitive  # `t2l generate` with its default --dtype auto
def test_cli_import_then_generate_uses_the_recorded_encoder(tmp_path, capsys):
    from tests.tiny_world import build_world

    from t2l_framework.assembly import load_runtime

    world = build_world(tmp_path / "world")
    gte = shutil.copytree(world["encoder"], tmp_path / "tiny-gte")  # the reference picks CLS pooling for gte
    shapes, order = {"q_proj": (64, 64), "v_proj": (64, 32)}, ["q_proj", "v_proj"]
    state = reference_state("S", shapes=shapes, order=order, n_layers=2, enc=32)
    folder = write_reference(tmp_path / "ref", state, "S", order=order,
                             args={"model_dir": str(world["llm"]), "emb_model": str(gte)})
    assert main(["import-reference", str(folder), "-o", str(tmp_path / "run")]) == 0
    assert "wrote" in capsys.readouterr().out
    # gte-large-en-v1.5 ships its own modelling code, so an imported run asks for the flag.
    assert main(["generate", str(tmp_path / "run"), "answer with apple", "-o", str(tmp_path / "adapter")]) == 1
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "run"), "answer with apple", "-o", str(tmp_path / "adapter"),
                 "--trust-remote-code"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    runtime = load_runtime(tmp_path / "run", device="cpu", trust_remote_code=True)
    assert runtime.generator.encoder.pooling == "cls"
    desc = "answer with apple"
    emb = runtime.generator.encoder.encode([desc])
    ours = runtime.adapters([desc])
    for m, (A, B) in reference_lora(state, KINDS["S"], shapes, order, RANK, emb).items():
        assert (ours.A[m][0] - A).abs().max() <= 1e-5 and (ours.B[m][0] - B).abs().max() <= 1e-5
    assert main(["import-reference", str(folder), "-o", str(tmp_path / "run")]) == 1
    assert "already exists and is not empty; pass --force" in capsys.readouterr().err


# --- refusals -----------------------------------------------------------------------------

def _nonzero_offset(state):
    state["AB_offset.A.q_proj"][0, 0, 0] = 0.5
    return state


def _no_head_bias(state):
    return {k: v for k, v in state.items() if not (k.startswith("heads.") and k.endswith(".bias"))}


Z_SCORES = {"training_task": "recon", "factorized": True, "pred_z_score": True}


REFUSALS = [
    ("one_hot", {"use_one_hot_task_emb": True}, None, "use_one_hot_task_emb: one-hot task embeddings"),
    ("vq", {"encoder_type": "vq"}, None, "encoder_type 'vq': only the linear task encoder"),
    ("learned_offset", {"mt_lora_path": "loras/mt", "learnable_AB_offset": True}, _nonzero_offset,
     "learnable_AB_offset: learned per-layer output offsets are not supported"),
    ("offset_raw_recon", {"training_task": "recon", "pred_z_score": False}, _nonzero_offset,
     r"AB_offset.A.q_proj is non-zero, but the reference does not apply it with training_task recon, factorized=False"),
    ("stats_in_sft", {}, lambda s: s | {"mean_recon_target.B.up_proj": torch.ones(N_LAYERS, 24, RANK)},
     r"mean_recon_target.B.up_proj is non-zero, but the reference does not apply it with training_task sft"),
    ("z_score_bias", Z_SCORES, None, r"hypermod.pt has heads.v_proj.bias, but the reference builds its heads without bias"),
    ("mt_lora_bias", {"mt_lora_path": "loras/mt"}, None, r"has heads.v_proj.bias, but .* without bias"),
    ("stats_shape", Z_SCORES, lambda s: _no_head_bias(s) | {"std_recon_target.A.q_proj": torch.ones(N_LAYERS, RANK, 15)},
     r"std_recon_target.A.q_proj has shape \[3, 4, 15\], not \[3, 4, 16\]"),
    ("stats_missing", Z_SCORES, lambda s: {k: v for k, v in _no_head_bias(s).items() if k != "mean_recon_target.B.v_proj"},
     "hypermod.pt has no 'mean_recon_target.B.v_proj'"),
    ("autoreg_L", {"autoreg_gen": True}, None, "autoreg_gen without shared_AB_head"),
    ("flag_vs_keys", {"shared_AB_head": True}, None, "shared_AB_head=True but hypermod.pt has no out_emb"),
    ("no_emb_model", {"emb_model": ""}, None, "emb_model is empty"),
    ("sfr", {"emb_model": "Salesforce/SFR-Embedding-2_R"}, None, "only gte encoders are supported"),
    ("latent", {"hypernet_latent_size": 64}, None, "hypernet_latent_size=64 but the weights give 16"),
    ("extra_key", {}, lambda s: s | {"mystery.weight": torch.ones(2)}, "no place in the framework's hypernetwork: mystery.weight"),
    ("missing_bias", {}, lambda s: {k: v for k, v in s.items() if k != "heads.q_proj.bias"}, "has no 'heads.q_proj.bias'"),
    ("head_shape", {}, lambda s: s | {"heads.q_proj.weight": torch.ones(3, HEAD_IN)}, r"heads.q_proj has shape \[3, 20\]"),
]


@pytest.mark.parametrize("name,args,edit,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_unrepresentable_checkpoints_are_refused_in_one_line(tmp_path, capsys, name, args, edit, message):
    state = reference_state("L")
    folder = write_reference(tmp_path / "ref", edit(state) if edit else state, args=args)
    with pytest.raises(T2LError, match=message):
        import_reference(folder, tmp_path / "run")
    assert main(["import-reference", str(folder), "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_module_order_and_missing_files(tmp_path):
    folder = write_reference(tmp_path / "ref", reference_state("L"))
    with pytest.raises(T2LError, match=r"--module-order \['q_proj', 'k_proj', 'up_proj'\] must name each"):
        import_reference(folder, tmp_path / "run", module_order=["q_proj", "k_proj", "up_proj"])
    (folder / "args.yaml").unlink()
    with pytest.raises(T2LError, match="missing args.yaml"):
        import_reference(folder, tmp_path / "run")


class _Payload:
    """Pickled, this would create a file when unpickled, if loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hypermod_pt_with_code_is_refused_and_never_run(tmp_path):
    folder = write_reference(tmp_path / "ref", reference_state("L"))
    marker = tmp_path / "code_ran"
    torch.save({"task_encoder.mlp.0.weight": _Payload(marker)}, folder / "hypermod.pt")
    with pytest.raises(T2LError, match=r"hypermod.pt: cannot read it as a tensors-only state dict \(weights_only=True\)"):
        import_reference(folder, tmp_path / "run")
    assert not marker.exists()


# --- the reference code itself (opt-in: needs a checkout of SakanaAI/text-to-lora) ----------

REFERENCE_SRC = os.environ.get("T2L_REFERENCE_SRC", "")


def _reference_module(monkeypatch, src: str):
    """Load the reference's ``hyper_modulator.py`` as is. Its LoRA formatting helpers (on the
    ``gen_lora`` path) are its own ``utils/lora_formatting.py``; the other package helpers (model
    loading) are not on the forward path and are stubbed; transformers' Llama rotary changed
    its constructor after 4.46, so the reference's call is adapted to the new one."""
    import importlib.util
    import sys
    import types

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = Path(src)
    if path.is_dir():
        path = path / "src" / "hyper_llm_modulator" / "hyper_modulator.py"
    formatting_spec = importlib.util.spec_from_file_location("hyper_llm_modulator.utils.lora_formatting",
                                                             path.parent / "utils" / "lora_formatting.py")
    formatting = importlib.util.module_from_spec(formatting_spec)
    formatting_spec.loader.exec_module(formatting)  # imports peft, safetensors and yaml only

    def unused(*args, **kwargs):
        raise NotImplementedError("not on the HyperModulator forward path")

    pkg, utils = types.ModuleType("hyper_llm_modulator"), types.ModuleType("hyper_llm_modulator.utils")
    pkg.__path__, utils.__path__ = [], []
    for name in ("get_layers", "get_model_and_tokenizer", "get_pooling_fn", "add_full_stop", "get_target_lora_dirs"):
        setattr(utils, name, unused)
    for name in ("get_lora_module_names", "lora_state_dict_to_tensor_dict", "lora_tensor_dict_to_state_dict",
                 "get_mean_lora", "get_std_lora"):
        setattr(utils, name, getattr(formatting, name))
    loading = types.ModuleType("hyper_llm_modulator.utils.model_loading")
    loading.get_emb_model_and_fns = unused
    for mod in (pkg, utils, loading):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    spec = importlib.util.spec_from_file_location("hyper_llm_modulator.hyper_modulator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def rotary_4_46(dim, max_position_embeddings=2048, device=None, **_):
        config = LlamaConfig(hidden_size=dim, num_attention_heads=1, max_position_embeddings=max_position_embeddings)
        return LlamaRotaryEmbedding(config).to(device)

    module.LlamaRotaryEmbedding = rotary_4_46
    return module


def _randomised_reference_folder(hypermod, peft_model, folder):
    """Random values everywhere the reference trains, saved as its training scripts save them
    (``torch.save(state_dict)``, ``peft_config.save_pretrained``); args.yaml is the caller's."""
    with torch.no_grad():
        for name, p in hypermod.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) * (1.0 if p.dim() > 1 else 3.0))
    folder.mkdir()
    torch.save(hypermod.state_dict(), folder / "hypermod.pt")
    peft_model.peft_config["default"].save_pretrained(folder)
    return folder


@pytest.mark.skipif(not REFERENCE_SRC, reason="set T2L_REFERENCE_SRC to a checkout of SakanaAI/text-to-lora "
                                              "(8ba7749) to compare with the reference code itself")
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_the_reference_code_itself(tiny_llama, tmp_path, monkeypatch, kind):
    from peft import LoraConfig, PeftModel

    ref = _reference_module(monkeypatch, REFERENCE_SRC)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, use_rslora=True, lora_dropout=0.05, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj"], base_model_name_or_path="tiny")
    peft_model = PeftModel(tiny_llama(), config)
    torch.manual_seed(0)
    hypermod = ref.HyperModulator(peft_model, output_space="lora", module_names=None, training_task="sft",
                                  task_emb_size=ENC, latent_size=LATENT, head_in_size=HEAD_IN, head_use_bias=True,
                                  zero_init_head=True, match_lora_init=True, **KINDS[kind])
    folder = _randomised_reference_folder(hypermod, peft_model, tmp_path / "ref")
    (folder / "args.yaml").write_text(yaml.safe_dump({
        "exp_setup": "hyper_lora", "training_task": "sft", "model_dir": "tiny", "encoder_type": "linear",
        "emb_model": "Alibaba-NLP/gte-large-en-v1.5", "hypernet_latent_size": LATENT, "head_in_size": HEAD_IN,
        **KINDS[kind]}))
    run = import_reference(folder, tmp_path / "run")  # default module order: adapter_config.json's
    net = HyperNetwork.from_pretrained(run / "hypernet").eval()
    hypermod.eval()
    emb = torch.randn(1, ENC) * 3
    layers = torch.arange(2)
    with torch.no_grad():
        ours = net(emb)
        encoded = hypermod.task_encoder(emb)["encoded_task_emb"]
        for m in ("q_proj", "v_proj"):
            A, B = hypermod.get_delta_weights(layers, m, encoded.expand(2, -1), factorized=True)
            assert (ours.A[m][0] - A).abs().max() <= 1e-5 and (ours.B[m][0] - B).abs().max() <= 1e-5, m
    assert net.num_trainable_parameters() == sum(p.numel() for p in hypermod.parameters() if p.requires_grad)


@pytest.mark.skipif(not REFERENCE_SRC, reason="set T2L_REFERENCE_SRC to a checkout of SakanaAI/text-to-lora "
                                              "(8ba7749) to compare with the reference code itself")
@pytest.mark.parametrize("setup", ["z_score", "mt_lora"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_output_buffers_match_the_reference_code_itself(tiny_llama, tmp_path, monkeypatch, kind, setup):
    """The reference's own gen_lora (get_delta_weights + convert_to_raw_scale) for a z-scored
    factorized reconstruction model and for an SFT model with a multi-task-LoRA offset."""
    from peft import LoraConfig, PeftModel

    ref = _reference_module(monkeypatch, REFERENCE_SRC)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, use_rslora=True, lora_dropout=0.05, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj"], base_model_name_or_path="tiny")
    peft_model = PeftModel(tiny_llama(), config)
    layers = torch.arange(2)
    module_names = ref.get_lora_module_names(peft_model, ["q_proj", "v_proj"], layers)
    in_f, out_f = ref.get_in_out_features(peft_model)
    g = torch.Generator().manual_seed(3)

    def tensor_dict():  # lora_state_dict_to_tensor_dict's layout: A [layers, r, in], B [layers, out, r]
        return {"A": {m: torch.randn(2, RANK, in_f[m], generator=g) for m in in_f},
                "B": {m: torch.randn(2, out_f[m], RANK, generator=g) for m in in_f}}

    if setup == "z_score":  # create_hypermod: head_use_bias = not pred_z_score in recon
        std = {ab: {m: t.abs() + 0.1 for m, t in d.items()} for ab, d in tensor_dict().items()}
        std["A"]["q_proj"][0, 0, 0] = 0.0
        kwargs = dict(training_task="recon", pred_z_score=True, factorized=True, mean_recon_target=tensor_dict(),
                      std_recon_target=std, head_use_bias=False)
        args = {"training_task": "recon", "pred_z_score": True, "factorized": True}
    else:  # create_hypermod: head_use_bias = match_lora_init = False with mt_lora_path
        kwargs = dict(training_task="sft", AB_offset=tensor_dict(), head_use_bias=False, zero_init_head=True)
        args = {"training_task": "sft", "mt_lora_path": "loras/mt"}
    torch.manual_seed(0)
    hypermod = ref.HyperModulator(peft_model, output_space="lora", module_names=module_names, task_emb_size=ENC,
                                  latent_size=LATENT, head_in_size=HEAD_IN, **KINDS[kind], **kwargs)
    folder = _randomised_reference_folder(hypermod, peft_model, tmp_path / "ref")
    (folder / "args.yaml").write_text(yaml.safe_dump({
        "exp_setup": "hyper_lora", "model_dir": "tiny", "encoder_type": "linear",
        "emb_model": "Alibaba-NLP/gte-large-en-v1.5", "hypernet_latent_size": LATENT, "head_in_size": HEAD_IN,
        **args, **KINDS[kind]}))
    net = HyperNetwork.from_pretrained(import_reference(folder, tmp_path / "run") / "hypernet").eval()
    hypermod.eval()
    emb = torch.randn(1, ENC) * 3
    with torch.no_grad():
        ours = net(emb)
        lora_sd = hypermod.gen_lora(layers, hypermod.task_encoder(emb)["encoded_task_emb"])
        plain = net.output_scale, net.output_offset
        net.output_scale = net.output_offset = None
        heads_only = net(emb)
        net.output_scale, net.output_offset = plain
    for m in ("q_proj", "v_proj"):
        for layer in layers:
            for name in module_names[m][layer]:
                mine, theirs = (ours.A if "lora_A" in name else ours.B)[m][0, layer], lora_sd[name]
                other = (heads_only.A if "lora_A" in name else heads_only.B)[m][0, layer]
                assert (mine - theirs).abs().max() <= 1e-5, name
                assert (theirs - other).abs().max() > 1e-2, name  # the buffers are applied, not left out
    zero_biases = sum(h.weight.shape[0] for h in hypermod.heads.values())
    assert net.num_trainable_parameters() == sum(p.numel() for p in hypermod.parameters() if p.requires_grad) \
        + zero_biases
