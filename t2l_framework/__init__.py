"""t2l-framework: Text-to-LoRA hypernetworks that turn a task description into LoRA weights."""

from __future__ import annotations

__version__ = "0.1.0"

# Public names are imported lazily so `t2l --help` does not pay for torch/transformers.
_EXPORTS = {
    "HypernetHead": "t2l_framework.hypernet.heads",
    "HyperNetwork": "t2l_framework.hypernet.hypernetwork",
    "LoraWeights": "t2l_framework.lora.weights",
    "ModuleShapes": "t2l_framework.lora.weights",
    "T2LError": "t2l_framework.errors",
    "load_recipe": "t2l_framework.assembly",  # the recipe schema plus the registry's name checks
    "load_runtime": "t2l_framework.assembly",
    "evaluate": "t2l_framework.assembly",  # what `t2l eval` does, as a function
    "hookimpl": "t2l_framework.plugins.hookspecs",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 't2l_framework' has no attribute '{name}'")


__all__ = list(_EXPORTS)
