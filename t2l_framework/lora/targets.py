"""Finding the targeted linear layers of a decoder-only model.

Module paths are derived from the model itself (its decoder-layer list), never hard-coded,
so the same code serves Llama, Mistral, Gemma, Qwen and multimodal wrappers. Linear layers
are ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2; weight stored ``[in, out]``).
"""

from __future__ import annotations

from torch import nn

from t2l_framework.errors import T2LError
from t2l_framework.lora.weights import ModuleShapes


def unwrap(module: nn.Module) -> nn.Module:
    """The original layer under any LoRA wrappers (ours nest; PEFT's keep ``base_layer`` too)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def layer_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer, or None for anything else.

    transformers' ``Conv1D`` (GPT-2, GPT-J's ancestors) is a linear layer whose weight is
    stored transposed, ``[in, out]``; its output is ``x @ W + b``.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, module list) of the text decoder layers, e.g. ``("model.layers", ...)``."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    n_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
        and (n_layers is None or len(mod) == n_layers)
    ]
    # A multimodal model also holds vision layers; the text decoder is the one we adapt.
    text = [c for c in candidates if "vision" not in c[0]] or candidates
    if not text:
        raise T2LError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(text, key=lambda c: len(c[1]))


def _is_linear(module: nn.Module) -> bool:
    # Wrapped layers (ours or PEFT's) keep the original in ``base_layer``.
    return layer_features(unwrap(module)) is not None


def linear_names(layer: nn.Module) -> list[str]:
    """Paths (relative to one decoder layer) of its linear layers, wrappers counted once."""
    names: list[str] = []
    for name, mod in layer.named_modules():
        if name and _is_linear(mod) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def fused_targets(model: nn.Module, family=None) -> dict[str, tuple[str, slice]]:
    """Logical target -> (physical layer name, output slice) for a model with fused projections.

    ``family``: the ``ModelFamily`` the caller resolved (the assembly layer does, once per run);
    None = no fused projections, every target is a linear layer of its own.
    """
    config = getattr(model, "config", None)
    if family is None or not family.fused_targets:
        return {}
    text_config = config.get_text_config()
    return {t: (name, fn(text_config)) for t, (name, fn) in family.fused_targets.items()}


def find_targets(model: nn.Module, target_modules: list[str], family=None) -> dict[str, list[tuple[str, nn.Module]]]:
    """target -> [(full module path, module)] for every decoder layer, in layer order.

    A target matches the layer-relative path (``self_attn.q_proj``) or its last part
    (``q_proj``); it must match exactly one linear layer in each decoder layer. A fused
    target (see ``ModelFamily.fused_targets``) resolves to its physical layer, so two
    targets may share one path; ``target_slices`` says which output columns each owns.
    """
    prefix, layers = decoder_layers(model)
    fused = fused_targets(model, family)
    found: dict[str, list[tuple[str, nn.Module]]] = {t: [] for t in target_modules}
    for i, layer in enumerate(layers):
        names = linear_names(layer)
        for target in target_modules:
            physical = fused[target][0] if target in fused else target
            hits = [n for n in names if n == physical or n.split(".")[-1] == physical]
            if len(hits) != 1:
                short = list(dict.fromkeys(n.split(".")[-1] for n in names))
                problem = "not found" if not hits else f"ambiguous ({', '.join(hits)})"
                via = f" (fused into '{physical}')" if physical != target else ""
                raise T2LError(
                    f"lora.target_modules: '{target}'{via} {problem} in {type(model).__name__}"
                    f"{f' layer {i}' if hits else ''}; linear modules per layer: {', '.join(short)}"
                )
            found[target].append((f"{prefix}.{i}.{hits[0]}", layer.get_submodule(hits[0])))
    return found


def target_slices(model: nn.Module, target_modules: list[str], family=None) -> dict[str, slice | None]:
    """target -> the output slice of its physical layer it owns (None: the whole output)."""
    fused = fused_targets(model, family)
    return {t: fused[t][1] if t in fused else None for t in target_modules}


def target_shapes(model: nn.Module, target_modules: list[str], family=None) -> ModuleShapes:
    """What a hypernetwork must generate: (in_features, out_features) per target.

    A fused target's out_features is the width of its slice, not of the physical layer.
    """
    found = find_targets(model, target_modules, family)
    slices = target_slices(model, target_modules, family)
    n_layers = len(next(iter(found.values()))) if found else 0
    shapes = {}
    for target, mods in found.items():
        in_f, out_f = layer_features(unwrap(mods[0][1]))
        if slices[target] is not None:
            out_f = len(range(out_f)[slices[target]])
        shapes[target] = (in_f, out_f)
    return ModuleShapes(n_layers, shapes)
