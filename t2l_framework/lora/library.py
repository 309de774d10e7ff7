"""A LoRA library: a folder with one PEFT adapter folder per task, named by task id
(``lora_library/lol_140/adapter_config.json``...), as ``training.mode: library`` writes it.
``training.mode: recon`` regresses one (``data.lora_library``)."""

from __future__ import annotations

import math
from pathlib import Path

from t2l_framework.errors import T2LError
from t2l_framework.lora.peft_io import import_peft_adapter
from t2l_framework.lora.weights import LoraWeights, ModuleShapes


def load_lora_library(folder: Path, lora=None) -> tuple[list[str], LoraWeights]:
    """(task ids, LoraWeights with one row per task) from a folder of PEFT adapters.

    lora: the recipe's ``lora`` section; every adapter must have its rank and scaling
    (lora_alpha / r, or / sqrt(r) with use_rslora), since the generated adapters are applied
    with the recipe's and regressing factors made for another scaling learns the wrong delta W.
    """
    if not folder.is_dir():
        raise T2LError(f"data.lora_library: folder '{folder}' does not exist; a training.mode=library run writes one "
                       "(RUN/library, e.g. `t2l fit smollm2_library`)")
    dirs = sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())
    if not dirs:
        raise T2LError(f"data.lora_library: '{folder}' holds no PEFT adapter folders (task_id/adapter_config.json)")
    weights = [import_peft_adapter(d) for d in dirs]
    if lora is not None:
        want = LoraWeights({}, {}, int(lora.rank), float(lora.alpha), bool(lora.use_rslora))
        for d, w in zip(dirs, weights):
            if w.rank != want.rank or not math.isclose(w.scaling, want.scaling, rel_tol=1e-6):
                raise T2LError(
                    f"data.lora_library: {d / 'adapter_config.json'} has r={w.rank}, lora_alpha={w.alpha:g}, "
                    f"use_rslora={str(w.use_rslora).lower()} (scaling {w.scaling:.4g}), but the recipe's lora "
                    f"section has rank={want.rank}, alpha={want.alpha:g}, use_rslora={str(want.use_rslora).lower()} "
                    f"(scaling {want.scaling:.4g}); set lora.rank / lora.alpha / lora.use_rslora to match the library"
                )
    first = weights[0]
    for d, w in zip(dirs, weights):
        if w.modules != first.modules or w.rank != first.rank or any(
                w.A[m].shape != first.A[m].shape for m in first.modules):
            raise T2LError(f"data.lora_library: adapter '{d}' has a different rank or shapes than '{dirs[0]}'")
    return [d.name for d in dirs], LoraWeights.cat(weights)


def library_shapes(weights: LoraWeights) -> ModuleShapes:
    """The module shapes a library's adapters are for (what a hypernetwork regressing it generates)."""
    return ModuleShapes(weights.n_layers, {m: (a.shape[-1], weights.B[m].shape[-2]) for m, a in weights.A.items()})
