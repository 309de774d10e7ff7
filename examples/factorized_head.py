"""A research head written outside the framework: ``FactorizedHead``.

Paper's L head (``per_layer``) maps the trunk's latent straight to ``r * (in + out)`` values
per module type with one Linear, ``latent x r(in+out)`` weights: the largest part of the
hypernetwork. This head factorises that Linear through a ``k``-wide bottleneck,

    features [rows, latent] -> down [rows, k] -> up [rows, r * (in + out)] -> A, B

so it costs ``latent * k + k * r(in+out)`` weights, about ``k / latent`` of per_layer's.

Use it from a recipe by import path (run `t2l` from the repository root; the current folder
is searched for import paths):

    hypernet:
      head: examples.factorized_head:FactorizedHead

or register it under a short name from a plugin's ``t2l_register_heads`` hook (below).
"""

from __future__ import annotations

import torch
from torch import nn

from t2l_framework.hypernet.heads import HypernetHead, peft_a_init, small_normal_
from t2l_framework.lora.weights import ModuleShapes
from t2l_framework.plugins.hookspecs import hookimpl


class FactorizedHead(HypernetHead):
    """Low-rank output layer per module type: ``latent -> bottleneck -> r * (in + out)``.

    Keeps the contract of ``HypernetHead``: constructor ``(latent_size, shapes, rank)``
    (``bottleneck`` has a default, so the framework can build it), ``forward(features, module)``
    with ``features: [rows, latent_size]`` returning ``A: [rows, r, in]``, ``B: [rows, out, r]``,
    and B == 0 exactly at init (the adapted model starts as the base model).
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, bottleneck: int = 8):
        super().__init__(latent_size, shapes, rank)
        self.bottleneck = bottleneck
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for in_f, out_f in shapes.shapes.values():
            down = nn.Linear(latent_size, bottleneck, bias=False)
            up = nn.Linear(bottleneck, rank * (in_f + out_f))
            with torch.no_grad():
                n_a = rank * in_f
                # Orthogonal rows keep the bottleneck's output at the features' scale, which
                # small_normal_ assumes when it sizes the A part against PEFT's init.
                nn.init.orthogonal_(down.weight)
                small_normal_(up.weight[:n_a], in_f)
                # B rows and bias zero: B == 0 at init. The B rows still get gradients (from the
                # non-zero bottleneck output), so B moves off zero on the first step.
                up.weight[n_a:].zero_()
                up.bias[:n_a].copy_(peft_a_init(rank, in_f, up.bias.device).flatten())
                up.bias[n_a:].zero_()
            self.down.append(down)
            self.up.append(up)

    def forward(self, features: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, latent] -> A [rows, r, in], B [rows, out, r]."""
        i = self.index(module)
        in_f, out_f = self.shapes.shapes[module]
        y = self.up[i](self.down[i](features))  # [rows, r * (in + out)]
        a, b = y.split([self.rank * in_f, self.rank * out_f], dim=-1)
        return a.unflatten(-1, (self.rank, in_f)), b.unflatten(-1, (out_f, self.rank))


@hookimpl
def t2l_register_heads(register):
    """Lets a plugin whose entry point names this module offer ``hypernet.head: factorized``."""
    register("factorized", FactorizedHead)
