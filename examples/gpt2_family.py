"""A third-party base-model family, registered through ``t2l_register_base_models``: GPT-2.

GPT-2 has no ``q_proj`` / ``v_proj``: each block computes q, k and v with one fused
projection, ``attn.c_attn``, a transformers ``Conv1D`` (weight stored ``[in, out]``) whose
output is ``[q | k | v]``, each ``n_embd`` wide. ``fused_targets`` tells the framework that the
logical targets ``q_proj`` and ``v_proj`` are the first and last thirds of that output, so a
generated LoRA for q changes only the q columns, exactly as a LoRA on a separate q_proj would.

Use it from a plugin package by pointing an entry point at this module::

    [project.entry-points.t2l]
    gpt2 = "examples.gpt2_family"

Adapters on fused slices cannot be exported as PEFT folders (PEFT has no per-slice LoRA);
``export_peft_adapter`` says so instead of writing a wrong adapter.
"""

from __future__ import annotations

from t2l_framework.llm.families import ModelFamily
from t2l_framework.plugins.hookspecs import hookimpl


def _third(index: int):
    """slice_fn for part ``index`` (0 = q, 1 = k, 2 = v) of c_attn's ``[3 * n_embd]`` output."""
    def slice_fn(config) -> slice:
        return slice(index * config.n_embd, (index + 1) * config.n_embd)

    return slice_fn


GPT2 = ModelFamily(
    "gpt2",
    ("gpt2",),
    fused_targets={"q_proj": ("c_attn", _third(0)), "k_proj": ("c_attn", _third(1)),
                   "v_proj": ("c_attn", _third(2))},
)


@hookimpl
def t2l_register_base_models(register):
    register(GPT2.name, GPT2)
