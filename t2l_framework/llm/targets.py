"""Finding the targeted linear layers of a decoder-only model.

Module paths are derived from the model itself (its decoder-layer list), never hard-coded,
so the same code serves Llama, Mistral, Gemma, Qwen and multimodal wrappers.
"""

from __future__ import annotations

from torch import nn

from t2l_framework.errors import T2LError
from t2l_framework.lora.weights import ModuleShapes


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
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _base_linear(module: nn.Module) -> nn.Linear:
    return module if isinstance(module, nn.Linear) else module.base_layer


def linear_names(layer: nn.Module) -> list[str]:
    """Paths (relative to one decoder layer) of its linear layers, wrappers counted once."""
    names: list[str] = []
    for name, mod in layer.named_modules():
        if name and _is_linear(mod) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def find_targets(model: nn.Module, target_modules: list[str]) -> dict[str, list[tuple[str, nn.Module]]]:
    """target -> [(full module path, module)] for every decoder layer, in layer order.

    A target matches the layer-relative path (``self_attn.q_proj``) or its last part
    (``q_proj``); it must match exactly one linear layer in each decoder layer.
    """
    prefix, layers = decoder_layers(model)
    found: dict[str, list[tuple[str, nn.Module]]] = {t: [] for t in target_modules}
    for i, layer in enumerate(layers):
        names = linear_names(layer)
        for target in target_modules:
            hits = [n for n in names if n == target or n.split(".")[-1] == target]
            if len(hits) != 1:
                short = list(dict.fromkeys(n.split(".")[-1] for n in names))
                problem = "not found" if not hits else f"ambiguous ({', '.join(hits)})"
                raise T2LError(
                    f"lora.target_modules: '{target}' {problem} in {type(model).__name__}"
                    f"{f' layer {i}' if hits else ''}; linear modules per layer: {', '.join(short)}"
                )
            found[target].append((f"{prefix}.{i}.{hits[0]}", layer.get_submodule(hits[0])))
    return found


def target_shapes(model: nn.Module, target_modules: list[str]) -> ModuleShapes:
    """What a hypernetwork must generate: (in_features, out_features) per target."""
    found = find_targets(model, target_modules)
    n_layers = len(next(iter(found.values()))) if found else 0
    shapes = {}
    for target, mods in found.items():
        lin = _base_linear(mods[0][1])
        shapes[target] = (lin.in_features, lin.out_features)
    return ModuleShapes(n_layers, shapes)
