"""Import a released T2L reference checkpoint (SakanaAI/text-to-lora) as an ordinary run folder.

A reference checkpoint folder holds ``hypermod.pt`` (``torch.save`` of ``HyperModulator``'s
state dict; read here with ``weights_only=True`` only, so nothing in it can execute),
``args.yaml`` (its training arguments) and ``adapter_config.json`` (its PEFT settings). The
result is what ``t2l fit`` writes: ``RUN/recipe.yaml`` + ``RUN/hypernet/`` (safetensors), so
``t2l generate``, ``t2l serve`` and ``t2l eval`` load it like any run; ``RUN/reference/``
keeps the two settings files and ``import.json`` records the source, the module order and
which reference buffers became the output scale and offset.

Every key of the state dict is mapped or refused. The reference's output buffers become the
network's ``output_scale`` / ``output_offset`` (``hypernet.output_scale`` / ``output_offset``
in the recipe), applied as its ``gen_lora`` applies them (``_output_buffers``): a factorized
reconstruction model with ``pred_z_score`` emits z-scores, so A (B) = z x (std + 1e-10) + mean
+ ``AB_offset`` (scale = ``std_recon_target`` + 1e-10, offset = ``mean_recon_target`` +
``AB_offset``); an SFT model (a multi-task-LoRA offset, ``mt_lora_path``) and a factorized
reconstruction model add ``AB_offset``; a raw-scale (not factorized) reconstruction model
applies none of them (its ``mean/std_recon_target``, filled whenever ``pred_z_score`` is set,
are unused there), and a buffer the reference does not apply must be zero. Heads without a
bias (the reference's ``head_use_bias`` is false with ``mt_lora_path`` or ``pred_z_score``)
get zero biases. What the framework cannot represent is refused with one ``T2LError``:
one-hot or non-linear task encoders, learnable ``AB_offset``, the un-shared autoregressive
head, and encoders whose pooling the reference picks by a name we do not know.

Module order: the reference keeps ``target_modules`` in a Python set, so which row of the
module-type embedding is ``q_proj`` depended on the training process's hash seed. The set
was written to ``adapter_config.json`` by that same process (``list(set)``, the order the
embedding rows were numbered in), so that order is the default; ``module_order`` overrides it.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml

from t2l_framework.atomic import atomic_file
from t2l_framework.errors import T2LError
from t2l_framework.hypernet.hypernetwork import Z_SCORE_STD_EPS
from t2l_framework.lora.weights import ModuleShapes
from t2l_framework.run_folder import RunFolder

FILES = ("hypermod.pt", "args.yaml", "adapter_config.json")
BUFFERS = ("AB_offset", "mean_recon_target", "std_recon_target")  # {buffer}.{A|B}.{module}


@dataclass
class ReferenceCheckpoint:
    """The three files of a reference checkpoint folder, parsed (nothing else is read)."""

    folder: Path
    state: dict[str, torch.Tensor]
    args: dict
    adapter: dict


def read_reference(folder: str | Path) -> ReferenceCheckpoint:
    """Parse ``hypermod.pt`` (tensors only), ``args.yaml`` (safe YAML) and ``adapter_config.json``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise T2LError(f"{folder}: no such folder; expected a T2L reference checkpoint folder ({', '.join(FILES)})")
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise T2LError(f"{folder}: not a T2L reference checkpoint folder: missing {', '.join(missing)}")
    path = folder / "hypermod.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise T2LError(f"{path}: cannot read it as a tensors-only state dict (weights_only=True): {first}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise T2LError(f"{path}: expected the state dict of a HyperModulator (a mapping of names to tensors)")
    try:
        args = yaml.safe_load((folder / "args.yaml").read_text())
    except yaml.YAMLError as exc:
        raise T2LError(f"{folder / 'args.yaml'}: malformed YAML: {str(exc).splitlines()[0]}") from None
    try:
        adapter = json.loads((folder / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise T2LError(f"{folder / 'adapter_config.json'}: malformed JSON: {exc}") from None
    if not isinstance(args, dict) or not isinstance(adapter, dict):
        raise T2LError(f"{folder}: args.yaml and adapter_config.json must each hold a mapping")
    return ReferenceCheckpoint(folder, {k: v.float() for k, v in state.items()}, args, adapter)


REQUIRED = ("task_encoder.mlp.0.weight", "layer_depth_encoder.0.weight", "layer_type_encoder.0.weight",
            "mlp3.4.weight")


def _refuse(ref: ReferenceCheckpoint, what: str) -> T2LError:
    return T2LError(f"{ref.folder}: cannot import this reference checkpoint: {what}")


def head_kind(ref: ReferenceCheckpoint) -> tuple[str, str]:
    """(our head name, chunk position) from args.yaml, cross-checked with the state dict's keys."""
    a, keys = ref.args, ref.state.keys()
    shared, autoreg, learned = (bool(a.get(k, False)) for k in ("shared_AB_head", "autoreg_gen", "learnable_pos_emb"))
    if autoreg and not shared:
        raise _refuse(ref, "autoreg_gen without shared_AB_head (a head the paper does not use) is not supported")
    has_out_emb = any(k.startswith("out_emb.") for k in keys)
    has_pos_emb = any(k.startswith("pos_emb.") for k in keys)
    if has_out_emb != shared:
        raise _refuse(ref, f"args.yaml says shared_AB_head={shared} but hypermod.pt "
                           f"{'has' if has_out_emb else 'has no'} out_emb.* keys")
    if has_pos_emb != (autoreg and learned):
        raise _refuse(ref, f"args.yaml says autoreg_gen={autoreg}, learnable_pos_emb={learned} but hypermod.pt "
                           f"{'has' if has_pos_emb else 'has no'} pos_emb.* keys")
    if not shared:
        return "per_layer", "rotary"
    if not autoreg:
        return "shared", "rotary"
    return "chunked", "learned" if learned else "rotary"


def _check_supported(ref: ReferenceCheckpoint) -> str:
    """Refuse training set-ups the framework cannot represent; returns the training task."""
    a = ref.args
    if a.get("exp_setup", "hyper_lora") != "hyper_lora":
        raise _refuse(ref, f"exp_setup '{a.get('exp_setup')}': only hyper_lora checkpoints generate LoRAs")
    if str(ref.adapter.get("peft_type", "LORA")).upper() != "LORA":
        raise _refuse(ref, f"adapter_config.json peft_type '{ref.adapter.get('peft_type')}': only LORA is supported")
    if a.get("use_one_hot_task_emb"):
        raise _refuse(ref, "use_one_hot_task_emb: one-hot task embeddings (one per training task) have no text encoder")
    if a.get("encoder_type", "linear") != "linear":
        raise _refuse(ref, f"encoder_type '{a.get('encoder_type')}': only the linear task encoder is supported")
    if a.get("learnable_AB_offset"):
        raise _refuse(ref, "learnable_AB_offset: learned per-layer output offsets are not supported")
    missing = [k for k in REQUIRED if k not in ref.state]
    if missing:
        raise _refuse(ref, f"hypermod.pt lacks {', '.join(missing)}: not a HyperModulator with a linear task encoder")
    task = a.get("training_task", "sft")
    if task not in ("sft", "recon"):
        raise _refuse(ref, f"training_task '{task}' is neither sft nor recon")
    return task


def _output_rule(ref: ReferenceCheckpoint, task: str) -> tuple[bool, bool]:
    """(z-scores, AB_offset added) as the reference's ``gen_lora`` turns its heads' output into A
    and B: ``get_delta_weights`` adds ``AB_offset`` in SFT; ``convert_to_raw_scale`` (recon only)
    un-standardises when factorized with ``pred_z_score`` and then adds ``AB_offset``, and when
    not factorized only divides by sqrt(``delta_w_scaling``)."""
    factorized = bool(ref.args.get("factorized", False))
    z_scores = task == "recon" and factorized and bool(ref.args.get("pred_z_score", True))
    return z_scores, task == "sft" or factorized


def _head_bias(ref: ReferenceCheckpoint, task: str) -> bool:
    """The reference's ``head_use_bias`` (``create_hypermod``)."""
    if task == "sft":
        return not ref.args.get("mt_lora_path")
    return not ref.args.get("pred_z_score", True)


def _output_buffers(ref: ReferenceCheckpoint, task: str, shapes: ModuleShapes, rank: int):
    """(scale, offset), each {module: (A [layers, r, in], B [layers, out, r])} or None: the
    reference's buffers where ``_output_rule`` applies them; a buffer it does not apply must be
    zero (else args.yaml does not describe hypermod.pt), except the z-score statistics that
    ``create_hypermod`` fills for every ``pred_z_score`` recon model and a raw-scale one ignores."""
    s, args = ref.state, ref.args
    z_scores, add_offset = _output_rule(ref, task)
    pred_z = bool(args.get("pred_z_score", True))
    applied = {"AB_offset": add_offset, "mean_recon_target": z_scores, "std_recon_target": z_scores}
    ignored = {"mean_recon_target", "std_recon_target"} if task == "recon" and pred_z and not z_scores else set()
    for m, (in_f, out_f) in shapes.shapes.items():
        for buffer in BUFFERS:
            for ab, shape in (("A", (shapes.n_layers, rank, in_f)), ("B", (shapes.n_layers, out_f, rank))):
                key = f"{buffer}.{ab}.{m}"
                if key not in s:
                    raise _refuse(ref, f"hypermod.pt has no '{key}'")
                if tuple(s[key].shape) != shape:
                    raise _refuse(ref, f"{key} has shape {list(s[key].shape)}, not {list(shape)}")
                if not applied[buffer] and buffer not in ignored and s[key].abs().max() > 0:
                    raise _refuse(ref, f"{key} is non-zero, but the reference does not apply it with training_task "
                                       f"{task}, factorized={bool(args.get('factorized', False))}, pred_z_score="
                                       f"{pred_z}: args.yaml does not describe this hypermod.pt")

    def pairs(buffer: str) -> dict:
        return {m: (s[f"{buffer}.A.{m}"], s[f"{buffer}.B.{m}"]) for m in shapes.modules}

    offset = pairs("AB_offset") if add_offset else None
    if z_scores:  # (z x (std + eps) + mean) + AB_offset; ours adds one offset, mean + AB_offset
        scale = {m: (a + Z_SCORE_STD_EPS, b + Z_SCORE_STD_EPS) for m, (a, b) in pairs("std_recon_target").items()}
        mean = pairs("mean_recon_target")
        return scale, {m: (mean[m][0] + offset[m][0], mean[m][1] + offset[m][1]) for m in shapes.modules}
    if offset is None or not any(t.abs().max() > 0 for pair in offset.values() for t in pair):
        return None, None  # nothing to add: the run folder carries no output buffers
    return None, offset


def _shapes(ref: ReferenceCheckpoint, modules: list[str], rank: int) -> ModuleShapes:
    """Layers from ``layer_depth_encoder.0.weight``; (in, out) per module from the
    ``AB_offset`` buffers ([layers, r, in] and [layers, out, r])."""
    n_layers = int(ref.state["layer_depth_encoder.0.weight"].shape[0])
    shapes = {}
    for m in modules:
        a, b = ref.state.get(f"AB_offset.A.{m}"), ref.state.get(f"AB_offset.B.{m}")
        if a is None or b is None:
            raise _refuse(ref, f"AB_offset.A.{m} / AB_offset.B.{m} missing: the layer shapes of '{m}' are unknown")
        if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != (n_layers, rank) or b.shape[0] != n_layers or b.shape[2] != rank:
            raise _refuse(ref, f"AB_offset shapes {list(a.shape)}, {list(b.shape)} for '{m}' do not fit "
                               f"{n_layers} layers at rank {rank}")
        shapes[m] = (int(a.shape[2]), int(b.shape[1]))
    return ModuleShapes(n_layers, shapes)


def _module_order(ref: ReferenceCheckpoint, module_order: Sequence[str] | None) -> list[str]:
    """The module-embedding row order: ``module_order``, else adapter_config.json's list."""
    heads = sorted({k.split(".")[1] for k in ref.state if k.startswith("heads.")})
    if isinstance(ref.adapter.get("target_modules"), str) and not module_order:
        raise _refuse(ref, "adapter_config.json target_modules is a regex; pass --module-order")
    order = list(module_order) if module_order else list(ref.adapter.get("target_modules") or [])
    source = "--module-order" if module_order else "adapter_config.json target_modules"
    if sorted(order) != heads or len(set(order)) != len(order):
        raise _refuse(ref, f"{source} {order} must name each of the checkpoint's modules {heads} once")
    return order


def _encoder(ref: ReferenceCheckpoint) -> dict:
    """The ``encoder`` recipe section for the reference's ``emb_model`` (how it picked pooling)."""
    name = str(ref.args.get("emb_model") or "")
    if not name:
        raise _refuse(ref, "emb_model is empty: the reference embedded descriptions with the base model itself "
                           "(last-token pooling), which the framework's encoders do not do")
    if "gte" not in name:
        raise _refuse(ref, f"emb_model '{name}': the reference chose pooling by name (gte: CLS; SFR: last token "
                           "with an instruction template); only gte encoders are supported")
    return {"name": "transformers", "model": name, "pooling": "cls", "prefix": "", "normalize": True,
            "normalize_scale": "sqrt_dim", "full_stop": True, "max_length": 8192, "trust_remote_code": True}


def _hypernet_config(ref: ReferenceCheckpoint, head: str, position: str) -> tuple[dict, int]:
    """Our ``hypernet`` section and the encoder width, read off the weights' shapes and
    cross-checked with args.yaml (``hypernet_latent_size``, ``head_in_size``)."""
    s = ref.state
    task_dim, enc_dim = (int(x) for x in s["task_encoder.mlp.0.weight"].shape)
    cfg = {"head": head, "task_dim": task_dim, "layer_emb_dim": int(s["layer_depth_encoder.0.weight"].shape[1]),
           "module_emb_dim": int(s["layer_type_encoder.0.weight"].shape[1]),
           "latent_size": int(s["mlp3.4.weight"].shape[0]), "n_residual_blocks": 2, "dropout": 0.05,
           "chunk_position": position}
    width = cfg["task_dim"] + cfg["layer_emb_dim"] + cfg["module_emb_dim"]
    for key, ours in (("hypernet_latent_size", width), ("head_in_size", cfg["latent_size"])):
        if key in ref.args and int(ref.args[key]) != ours:
            raise _refuse(ref, f"args.yaml {key}={ref.args[key]} but the weights give {ours}")
    return cfg, enc_dim


def _map_state(ref: ReferenceCheckpoint, net, order: list[str], scale: float, head_bias: bool,
               outputs: tuple[dict | None, dict | None]) -> dict[str, torch.Tensor]:
    """Our state dict from the reference's; every reference key is used or refused. head_bias:
    the reference's heads have biases (else ours get zeros); outputs: ``_output_buffers``."""
    s, used, out = ref.state, set(), {}

    def take(ref_key: str) -> torch.Tensor:
        if ref_key not in s:
            raise _refuse(ref, f"hypermod.pt has no '{ref_key}'")
        used.add(ref_key)
        return s[ref_key]

    prefixes = {"trunk.task_proj.": "task_encoder.mlp.", "trunk.layer_emb.": "layer_depth_encoder.",
                "trunk.module_emb.": "layer_type_encoder.", "trunk.mixer.": "mixer.", "trunk.blocks.0.": "mlp1.",
                "trunk.blocks.1.": "mlp2.", "trunk.out.": "mlp3."}
    for key in net.state_dict():
        for ours, theirs in prefixes.items():
            if key.startswith(ours):
                out[key] = take(theirs + key[len(ours):])
    # The reference numbered the module-type embedding rows in its set order; ``order`` is ours too.
    shapes, r = net.shapes.shapes, net.rank
    for i, m in enumerate(order):
        weight = take(f"heads.{m}.weight")
        if head_bias:
            bias = take(f"heads.{m}.bias")
        elif f"heads.{m}.bias" in s:
            raise _refuse(ref, f"hypermod.pt has heads.{m}.bias, but the reference builds its heads without bias "
                               "when mt_lora_path (SFT) or pred_z_score (recon) is set, as args.yaml says")
        else:
            bias = torch.zeros(weight.shape[0])
        if weight.shape != net.head.out[i].weight.shape or bias.shape != net.head.out[i].bias.shape:
            raise _refuse(ref, f"heads.{m} has shape {list(weight.shape)}, but a {net.head_name} head for {m} "
                               f"{shapes[m]} at rank {r} needs {list(net.head.out[i].weight.shape)}")
        if net.head_name == "per_layer":
            in_f, out_f = shapes[m]
            n_a = r * in_f
            # Reference B values are rank-major [r, out]; ours are out-major [out, r].
            weight = torch.cat([weight[:n_a], weight[n_a:].view(r, out_f, -1).transpose(0, 1).reshape(r * out_f, -1)])
            bias = torch.cat([bias[:n_a], bias[n_a:].view(r, out_f).t().reshape(-1)])
        out[f"head.out.{i}.weight"], out[f"head.out.{i}.bias"] = weight * scale, bias * scale
    if net.head_name in ("shared", "chunked"):
        out["head.ab_emb"] = torch.stack([torch.stack([take(f"out_emb.{m}.A"), take(f"out_emb.{m}.B")]) for m in order])
        out["head.ab_norm.weight"], out["head.ab_norm.bias"] = take("out_emb_norm.weight"), take("out_emb_norm.bias")
    if net.head_name == "chunked" and net.head.position == "learned":
        for k in ("0.weight", "1.weight", "1.bias"):
            out[f"head.pos_emb.{k}"] = take(f"pos_emb.{k}")
    if "rotary_emb.inv_freq" in s:  # transformers 4.46 does not save it; check it if present
        width = net.trunk.width
        if net.head_name != "chunked" or not torch.allclose(
                take("rotary_emb.inv_freq"), 1.0 / 10000.0 ** (torch.arange(0, width, 2).float() / width)):
            raise _refuse(ref, "rotary_emb.inv_freq is not the default rotary embedding of the trunk width")
    used |= {f"{b}.{ab}.{m}" for b in BUFFERS for ab in "AB" for m in order}  # checked by _output_buffers
    for name, buffers in zip(("output_scale", "output_offset"), outputs):
        for i, m in enumerate(net.shapes.modules):
            if buffers is not None:
                out[f"{name}.A{i}"], out[f"{name}.B{i}"] = buffers[m]
    unknown = sorted(set(s) - used)
    if unknown:
        raise _refuse(ref, f"hypermod.pt keys with no place in the framework's hypernetwork: {', '.join(unknown[:5])}"
                           + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    expected = net.state_dict()
    wrong = [f"{k} {list(v.shape)} != {list(expected[k].shape)}" for k, v in out.items() if v.shape != expected[k].shape]
    if wrong or set(out) != set(expected):
        problem = wrong[:3] or sorted(set(expected) ^ set(out))[:3]
        raise _refuse(ref, f"the weights do not fit the {net.head_name} head they describe: {'; '.join(map(str, problem))}")
    return out


def convert(ref: ReferenceCheckpoint, module_order: Sequence[str] | None = None):
    """A ``HyperNetwork`` holding the reference's weights, and the recipe sections that go with it."""
    from t2l_framework.config import HypernetConfig, LoraConfig
    from t2l_framework.hypernet.hypernetwork import HyperNetwork

    task = _check_supported(ref)
    head, position = head_kind(ref)
    order = _module_order(ref, module_order)
    for key in ("r", "lora_alpha"):
        if key not in ref.adapter:
            raise _refuse(ref, f"adapter_config.json has no '{key}'")
    rank = int(ref.adapter["r"])
    lora = {"rank": rank, "alpha": float(ref.adapter["lora_alpha"]), "use_rslora": bool(ref.adapter.get("use_rslora", False)),
            "dropout": float(ref.adapter.get("lora_dropout", 0.0)), "target_modules": order}
    shapes = _shapes(ref, order, rank)
    outputs = _output_buffers(ref, task, shapes, rank)
    if ref.state["layer_type_encoder.0.weight"].shape[0] != len(order):
        raise _refuse(ref, f"layer_type_encoder has {ref.state['layer_type_encoder.0.weight'].shape[0]} rows for "
                           f"{len(order)} modules")
    hypernet, enc_dim = _hypernet_config(ref, head, position)
    hypernet["output_scale"], hypernet["output_offset"] = (b is not None for b in outputs)
    encoder = _encoder(ref)
    base_model = str(ref.args.get("model_dir") or ref.adapter.get("base_model_name_or_path") or "")
    if not base_model:
        raise _refuse(ref, "neither args.yaml model_dir nor adapter_config.json base_model_name_or_path names the base model")
    meta = {k: encoder[k] for k in ("name", "model", "prefix", "normalize", "pooling", "normalize_scale", "full_stop")}
    net = HyperNetwork(shapes, enc_dim, HypernetConfig(**hypernet), LoraConfig(**lora), base_model=base_model,
                       encoder=meta)
    # A raw-scale reconstruction model divides its A and B by sqrt(delta_w_scaling) on output;
    # the heads are linear, so that folds into their weights and biases exactly.
    scale = 1.0 / math.sqrt(float(ref.args.get("delta_w_scaling", 10000))) \
        if task == "recon" and not ref.args.get("factorized", False) else 1.0
    with torch.no_grad():
        net.load_state_dict(_map_state(ref, net, order, scale, _head_bias(ref, task), outputs), strict=True)
    recipe = {
        "description": f"T2L reference checkpoint {ref.folder.name} ({head} head), imported",
        "base_model": {"name_or_path": base_model},
        "encoder": encoder,
        "hypernet": hypernet,
        "lora": lora,
    }
    return net.eval(), recipe


def import_reference(src: str | Path, out: str | Path, module_order: Sequence[str] | None = None,
                     force: bool = False) -> Path:
    """Write the run folder ``out`` for the reference checkpoint folder ``src``."""
    from omegaconf import OmegaConf

    from t2l_framework.config import Recipe, validate

    ref = read_reference(src)
    net, sections = convert(ref, module_order)
    out = Path(out).expanduser()
    if out.is_dir() and any(out.iterdir()) and not force:
        raise T2LError(f"{out} already exists and is not empty; pass --force to write into it, or -o DIR "
                       "for another folder")
    recipe = OmegaConf.merge(OmegaConf.structured(Recipe), sections)
    validate(recipe, check_files=False)  # what the loaders will read must validate
    if out.exists() and not out.is_dir():
        raise T2LError(f"{out} is a file; -o needs a folder")
    out.mkdir(parents=True, exist_ok=True)  # with force, our files are overwritten and nothing is deleted
    run = RunFolder(out)
    with atomic_file(run.recipe) as tmp:
        tmp.write_text(OmegaConf.to_yaml(recipe))
    net.save_pretrained(run.hypernet)
    run.reference.mkdir(exist_ok=True)
    for name in ("args.yaml", "adapter_config.json"):
        with atomic_file(run.reference / name) as tmp:
            shutil.copyfile(ref.folder / name, tmp)
    with atomic_file(run.reference / "import.json") as tmp:
        tmp.write_text(json.dumps({
            "source": str(ref.folder.resolve()), "head": net.head_name, "module_order": net.target_modules,
            "module_order_from": "--module-order" if module_order else "adapter_config.json target_modules",
            "emb_model": sections["encoder"]["model"], "base_model": sections["base_model"]["name_or_path"],
            "training_task": ref.args.get("training_task", "sft"),
            "output_scale": "std_recon_target + 1e-10" if net.output_scale is not None else None,
            "output_offset": None if net.output_offset is None else
            "mean_recon_target + AB_offset" if net.output_scale is not None else "AB_offset",
        }, indent=2) + "\n")
    return out
