"""Export generated LoRAs as standard PEFT adapter folders, and read such folders back.

A folder holds ``adapter_config.json`` (written by PEFT's own ``LoraConfig``) and
``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module path>.lora_A.weight``), so ``PeftModel.from_pretrained`` and
vLLM load it. Module paths come from the model (its decoder-layer list), not a fixed prefix.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from t2l_framework.atomic import atomic_folder
from t2l_framework.config import RANGES
from t2l_framework.errors import T2LError
from t2l_framework.lora.targets import find_targets
from t2l_framework.lora.weights import LoraWeights
from t2l_framework.run_folder import PEFT_CONFIG as CONFIG_NAME
from t2l_framework.run_folder import PEFT_WEIGHTS as WEIGHTS_NAME

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"^(?P<prefix>.+)\.(?P<layer>\d+)\.(?P<module>.+)$")


def module_paths(model: nn.Module, target_modules: list[str], family=None) -> dict[str, list[str]]:
    """target -> module path per decoder layer, e.g. ``model.layers.3.self_attn.q_proj``
    (family: the loaded model's ``ModelFamily``, for fused projections)."""
    return {t: [path for path, _ in mods] for t, mods in find_targets(model, target_modules, family).items()}


def export_peft_adapter(
    weights: LoraWeights,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str,
    model: nn.Module | None = None,
    paths: dict[str, list[str]] | None = None,
    family=None,
) -> Path:
    """Write one adapter (``weights`` of batch 1) as a PEFT LoRA folder, atomically.

    weights.A[m]: [1, n_layers, r, in_m]; weights.B[m]: [1, n_layers, out_m, r].
    Module paths come from ``paths`` (e.g. ``LoraInjection.paths``) or from ``model`` (with
    its ``ModelFamily``, whose fused projections PEFT cannot express).
    """
    from peft import LoraConfig

    if weights.batch_size != 1:
        raise T2LError(f"export_peft_adapter writes one adapter; got a batch of {weights.batch_size} (use weights.select(i))")
    if paths is None:
        if model is None:
            raise T2LError("export_peft_adapter needs the base model (or module paths) to name the LoRA modules")
        paths = module_paths(model, weights.modules, family)
    _refuse_fused(paths, weights.modules)
    tensors = {}
    for target in weights.modules:
        if len(paths[target]) != weights.n_layers:
            raise T2LError(f"'{target}': weights have {weights.n_layers} layers, the model {len(paths[target])}")
        for i, path in enumerate(paths[target]):
            tensors[f"base_model.model.{path}.lora_A.weight"] = weights.A[target][0, i].detach().contiguous().cpu()
            tensors[f"base_model.model.{path}.lora_B.weight"] = weights.B[target][0, i].detach().contiguous().cpu()
    config = LoraConfig(
        r=weights.rank, lora_alpha=weights.alpha, use_rslora=weights.use_rslora,
        target_modules=list(weights.modules), lora_dropout=0.0,
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
    )

    out = Path(out_dir)
    with atomic_folder(out, replace=True) as tmp:  # replaces an older export of the same name
        config.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return out


def _refuse_fused(paths: dict[str, list[str]], targets: list[str]) -> None:
    """A target whose module path is another layer's (a slice of a fused q|k|v projection)
    has no PEFT form: a PEFT LoRA on a module adds B @ A to its whole output, and PEFT keys
    name modules, so q and v on one ``c_attn`` would even collide on the same key."""
    for target in targets:
        path = paths[target][0]
        if path != target and not path.endswith("." + target):
            raise T2LError(
                f"cannot export '{target}' as a PEFT adapter: it is an output slice of the fused layer "
                f"'{path}', and a PEFT LoRA always adds its delta to a module's whole output "
                "(PEFT has no per-slice LoRA). Keep the generated weights as LoraWeights, or target "
                "unfused layers for an exportable adapter."
            )


MAX_RANK = RANGES["lora.rank"][1]  # the recipes' bound


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise T2LError(f"{config_file}: not readable as JSON") from None
    except RecursionError:
        raise T2LError(f"{config_file}: malformed JSON: nested too deeply") from None
    if not isinstance(config, dict):
        raise T2LError(f"{config_file}: expected a JSON object")
    return config


def _tensor_shapes(weights_file: Path) -> dict[str, list[int]]:
    """name -> shape, from the safetensors header alone (nothing is allocated)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise T2LError(f"{weights_file}: not a readable safetensors file") from None


def _check_factors(config: dict, shapes: dict[str, list[int]], config_file: Path, weights_file: Path):
    """(rank, alpha, use_rslora, targets) once the config agrees with the tensors: rank, 2-D factors
    of that rank, a finite positive scaling, factor names among ``target_modules``."""
    rank, alpha, rslora = config.get("r"), config.get("lora_alpha"), config.get("use_rslora", False)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise T2LError(f"{config_file}: 'r': expected a positive integer up to {MAX_RANK}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise T2LError(f"{config_file}: 'lora_alpha': expected a finite number > 0")
    if not isinstance(rslora, bool):
        raise T2LError(f"{config_file}: 'use_rslora': expected true or false")
    targets = config.get("target_modules") or []
    named = isinstance(targets, list)  # a string is PEFT's regex over module paths: names are not checked
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise T2LError(f"{config_file}: 'target_modules': expected a list of module names")
    per_target: dict[tuple[str, str], set[tuple[int, ...]]] = {}
    layers: dict[tuple[str, str], set[int]] = {}
    for key, shape in shapes.items():
        match = _KEY.match(key)
        layer = _LAYER.match(match["path"]) if match else None
        if layer is None:
            continue
        inner = layer["module"]
        if named and targets and not any(inner == t or inner.endswith("." + t) for t in targets):
            raise T2LError(f"{weights_file}: a LoRA factor is for a module that {config_file.name}'s "
                           "'target_modules' does not name")
        rank_dim = 0 if match["ab"] == "A" else 1
        if len(shape) != 2 or shape[rank_dim] != rank:
            raise T2LError(f"{weights_file}: lora_{match['ab']} factors must be 2-D with {config_file.name}'s "
                           f"rank 'r' on dimension {rank_dim}")
        per_target.setdefault((inner, match["ab"]), set()).add(tuple(shape))
        layers.setdefault((inner, match["ab"]), set()).add(int(layer["layer"]))
    if any(len(found) > 1 for found in per_target.values()):
        raise T2LError(f"{weights_file}: the LoRA factors of one module differ in shape between layers")
    if layers and any(found != set(range(len(found))) for found in layers.values()):
        raise T2LError(f"{weights_file}: every LoRA module needs lora_A and lora_B factors for layers 0, 1, ... "
                       "without gaps")
    modules = {m for m, _ in layers}
    if len({len(found) for found in layers.values()}) > 1 or len(layers) != 2 * len(modules):
        raise T2LError(f"{weights_file}: the LoRA modules do not all have lora_A and lora_B factors for the "
                       "same layers")
    return rank, float(alpha), rslora, list(targets)


def import_peft_adapter(adapter_dir: str | os.PathLike) -> LoraWeights:
    """Read a PEFT LoRA folder into ``LoraWeights`` of batch 1 (fp32 as stored).

    The folder is untrusted input: its config is checked against the safetensors header
    (rank, factor shapes, scaling, target names) before a tensor is read, and errors name the
    file and key, not the values found there.
    """
    folder = Path(adapter_dir)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise T2LError(f"'{folder}' is not a PEFT LoRA folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} in it")
    config = _read_config(config_file)
    if config.get("peft_type") != "LORA":
        raise T2LError(f"{config_file}: 'peft_type' is not LORA; only LoRA adapters can be imported")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if config.get(unsupported):
            raise T2LError(f"{config_file}: per-module '{unsupported}' is not supported (one rank and alpha for all modules)")
    if config.get("use_dora"):
        raise T2LError(f"{config_file}: DoRA adapters are not supported")
    rank, alpha, rslora, targets = _check_factors(config, _tensor_shapes(weights_file), config_file, weights_file)

    factors: dict[str, dict[str, dict[int, torch.Tensor]]] = {"A": {}, "B": {}}
    for key, tensor in load_file(str(weights_file)).items():
        match = _KEY.match(key)
        layer = _LAYER.match(match["path"]) if match else None
        if layer is None:
            continue  # e.g. modules_to_save or embedding tensors: not LoRA factors of a layer
        inner = layer["module"]
        target = next((t for t in targets if inner == t or inner.endswith("." + t)), inner.split(".")[-1])
        factors[match["ab"]].setdefault(target, {})[int(layer["layer"])] = tensor
    if not factors["A"]:
        raise T2LError(f"{weights_file}: no per-layer LoRA factors (keys like '...layers.0.self_attn.q_proj.lora_A.weight')")
    n_layers = 1 + max(i for per in factors["A"].values() for i in per)
    A, B = {}, {}
    # PEFT stores target_modules as a set; keep the config's order where it names the target.
    order = sorted(factors["A"], key=lambda t: targets.index(t) if t in targets else len(targets))
    for target in order:
        per_layer = factors["A"][target]
        missing = [i for i in range(n_layers) if i not in per_layer or i not in factors["B"].get(target, {})]
        if missing:
            raise T2LError(f"{weights_file}: '{target}' has no LoRA factors for layers {missing}")
        A[target] = torch.stack([per_layer[i] for i in range(n_layers)])[None]
        B[target] = torch.stack([factors["B"][target][i] for i in range(n_layers)])[None]
    return LoraWeights(A, B, rank, alpha, rslora)
