"""A research head written outside the framework: ``FactorizedHead``.

Paper's L head (``per_layer``) maps the trunk's latent straight to ``r * (in + out)`` values
per module type with one Linear, ``latent x r(in+out)`` weights: the largest part of the
hypernetwork. This head factorises that Linear through a ``k``-wide bottleneck,

    features [rows, width] -> trunk.finish -> [rows, latent] -> down [rows, k]
        -> up [rows, r * (in + out)] -> A, B

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

from t2l_framework.hypernet.heads import HypernetHead, peft_a_init
from t2l_framework.lora.weights import ModuleShapes
from t2l_framework.plugins.hookspecs import hookimpl


class FactorizedHead(HypernetHead):
    """Low-rank output layer per module type: ``latent -> bottleneck -> r * (in + out)``.

    Keeps the contract of ``HypernetHead``: constructor ``(latent_size, shapes, rank,
    trunk_width)`` (``bottleneck`` has a default, so the framework can build it) and
    ``forward(features, module, trunk)``: it does not condition the trunk's middle, so it
    finishes the trunk first (``trunk.finish(features)`` -> ``[rows, latent_size]``) and returns
    ``A: [rows, r, in]``, ``B: [rows, out, r]``. Init as the paper's L: ``up`` has zero weights
    and PEFT's A init as its A bias, so B == 0 (the adapted model starts as the base model).
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, trunk_width: int, bottleneck: int = 8):
        super().__init__(latent_size, shapes, rank, trunk_width)
        self.bottleneck = bottleneck
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for in_f, out_f in shapes.shapes.values():
            down = nn.Linear(latent_size, bottleneck, bias=False)
            up = nn.Linear(bottleneck, rank * (in_f + out_f))
            with torch.no_grad():
                n_a = rank * in_f
                # Orthogonal rows keep the bottleneck's output at the features' scale.
                nn.init.orthogonal_(down.weight)
                # Zero weights: A = PEFT's init and B == 0 at init. ``up`` still gets gradients
                # (from the non-zero bottleneck output), so B moves off zero on the first step
                # and ``down`` and the trunk learn from the second.
                up.weight.zero_()
                up.bias[:n_a].copy_(peft_a_init(rank, in_f, up.bias.device).flatten())
                up.bias[n_a:].zero_()
            self.down.append(down)
            self.up.append(up)

    def forward(self, features: torch.Tensor, module: str, trunk: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, trunk_width] -> A [rows, r, in], B [rows, out, r]."""
        i = self.index(module)
        in_f, out_f = self.shapes.shapes[module]
        y = self.up[i](self.down[i](trunk.finish(features)))  # [rows, r * (in + out)]
        a, b = y.split([self.rank * in_f, self.rank * out_f], dim=-1)
        return a.unflatten(-1, (self.rank, in_f)), b.unflatten(-1, (out_f, self.rank))


@hookimpl
def t2l_register_heads(register):
    """Lets a plugin whose entry point names this module offer ``hypernet.head: factorized``."""
    register("factorized", FactorizedHead)
