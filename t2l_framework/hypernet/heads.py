"""Output heads: trunk features -> LoRA factors A and B for one module type.

The contract (``HypernetHead``) is small so research users can write their own head and
name it in a recipe (``hypernet.head: mypkg.heads:MyHead``) or register it through a plugin.

Every built-in head starts out generating PEFT's default LoRA init: A is kaiming-uniform
random (held in the output bias), B is exactly zero, so the adapted model equals the base
model at step 0. Gradients still reach every parameter: the A path carries weights that are
small but not zero, so the trunk learns from the first step.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from t2l_framework.lora.weights import ModuleShapes

# Generated A = PEFT init (bias) + task-dependent part whose scale is this fraction of the init's.
A_WEIGHT_RATIO = 0.25


def peft_a_init(rank: int, in_features: int, device=None) -> torch.Tensor:
    """A PEFT-style default ``lora_A`` init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in)), [rank, in]."""
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(rank, in_features, device=device).uniform_(-bound, bound)


def small_normal_(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Init output rows so that ``W @ h`` is ~A_WEIGHT_RATIO x the A init scale for unit-rms ``h``."""
    std = A_WEIGHT_RATIO / math.sqrt(3 * in_features) / math.sqrt(weight.shape[-1])
    return nn.init.normal_(weight, 0.0, std)


class HypernetHead(nn.Module, abc.ABC):
    """Base class of all heads.

    Subclasses keep the constructor signature ``(latent_size, shapes, rank)`` and implement
    ``forward(features, module) -> (A, B)``:

    - ``features``: ``[rows, latent_size]`` trunk output; all rows belong to module type
      ``module`` (one of ``shapes.modules``); rows are (sample, layer) pairs, sample-major,
      i.e. ``rows = batch * n_layers``.
    - returns ``A``: ``[rows, rank, in_features]`` and ``B``: ``[rows, out_features, rank]``
      (PEFT's convention: delta W = (alpha / rank) * B @ A).

    ``HyperNetwork`` calls the head once per module type (each has its own shapes), never per
    layer or per sample, so a head must be vectorised over rows. To keep the base model
    unchanged at step 0, generate B == 0 at init.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int):
        super().__init__()
        self.latent_size = latent_size
        self.shapes = shapes
        self.rank = rank
        self.module_names = list(shapes.modules)
        self._index = {m: i for i, m in enumerate(self.module_names)}

    def index(self, module: str) -> int:
        """Position of module type ``module`` in ``shapes`` (and in this head's per-module lists)."""
        return self._index[module]

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Subclasses compute this (see the class docstring)."""


class PerLayerHead(HypernetHead):
    """Paper's L: per module type, one Linear emitting A and B together, ``r * (in + out)`` values."""

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int):
        super().__init__(latent_size, shapes, rank)
        self.out = nn.ModuleList()
        for in_f, out_f in shapes.shapes.values():
            layer = nn.Linear(latent_size, rank * (in_f + out_f))
            with torch.no_grad():
                n_a = rank * in_f
                small_normal_(layer.weight[:n_a], in_f)
                layer.weight[n_a:].zero_()  # B rows zero: B == 0 exactly at init
                layer.bias[:n_a].copy_(peft_a_init(rank, in_f, layer.bias.device).flatten())
                layer.bias[n_a:].zero_()
            self.out.append(layer)

    def forward(self, features: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, latent] -> A [rows, r, in], B [rows, out, r]."""
        in_f, out_f = self.shapes.shapes[module]
        y = self.out[self.index(module)](features)  # [rows, r * (in + out)]
        a, b = y.split([self.rank * in_f, self.rank * out_f], dim=-1)
        return a.unflatten(-1, (self.rank, in_f)), b.unflatten(-1, (out_f, self.rank))


class _SharedABBase(HypernetHead):
    """A and B share one output Linear per module type; a learned A/B embedding tells them apart.

    Per module type and per A/B: an input embedding (added to the features before a LayerNorm
    and SiLU, so A-rows and B-rows are different non-linear functions of the features), an
    output gain and an output bias. B's gain starts at 0 and its bias at 0, which makes B == 0
    exactly at init while the shared weight still learns through the A path.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, out_size: dict[str, int]):
        super().__init__(latent_size, shapes, rank)
        n = len(self.module_names)
        self.ab_emb = nn.Parameter(torch.randn(n, 2, latent_size))  # [module, A|B, latent]
        self.norm = nn.LayerNorm(latent_size)
        self.gain = nn.Parameter(torch.tensor([[1.0, 0.0]] * n))  # [module, A|B]
        self.out = nn.ModuleList()
        for m, (in_f, _) in shapes.shapes.items():
            layer = nn.Linear(latent_size, out_size[m], bias=False)
            with torch.no_grad():
                small_normal_(layer.weight, in_f)
            self.out.append(layer)

    def ab_features(self, features: torch.Tensor, i: int) -> torch.Tensor:
        """features [..., latent] -> [..., 2, latent] (A-row, B-row)."""
        return F.silu(self.norm(features.unsqueeze(-2) + self.ab_emb[i]))


class SharedHead(_SharedABBase):
    """Paper's M: one output Linear of ``r * max(in, out)`` per module type shared by A and B.

    Rows double (an A-row and a B-row per (sample, layer)); A keeps the first ``in`` and B the
    first ``out`` values of each of the r chunks.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int):
        widths = {m: max(i, o) for m, (i, o) in shapes.shapes.items()}
        super().__init__(latent_size, shapes, rank, {m: rank * w for m, w in widths.items()})
        self.bias = nn.ParameterList()
        for m, (in_f, _) in shapes.shapes.items():
            bias = torch.zeros(2, rank, widths[m], device=self.ab_emb.device)  # [A|B, r, max]
            bias[0, :, :in_f] = peft_a_init(rank, in_f, bias.device)
            self.bias.append(nn.Parameter(bias.flatten(1)))

    def forward(self, features: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, latent] -> A [rows, r, in], B [rows, out, r]."""
        i = self.index(module)
        in_f, out_f = self.shapes.shapes[module]
        feats = self.ab_features(features, i)  # [rows, 2, latent]
        a = self._chunks(feats[:, 0], i, 0, in_f)  # [rows, r, in]
        b = self._chunks(feats[:, 1], i, 1, out_f)  # [rows, r, out]
        return a, b.transpose(1, 2)

    def _chunks(self, x: torch.Tensor, i: int, ab: int, keep: int) -> torch.Tensor:
        """x [rows, latent] -> [rows, r, keep]: only the ``keep`` used columns of each of the r
        chunks are computed (for v_proj's B that skips two thirds of the output layer)."""
        weight, bias = self.out[i].weight, self.bias[i][ab]  # [r * max, latent], [r * max]
        width = weight.shape[0] // self.rank
        if keep < width:
            weight = weight.view(self.rank, width, -1)[:, :keep].reshape(self.rank * keep, -1)
            bias = bias.view(self.rank, width)[:, :keep].reshape(-1)
        return (F.linear(x, weight) * self.gain[i][ab] + bias).view(-1, self.rank, keep)


class ChunkedHead(_SharedABBase):
    """Paper's S: emits one rank-1 chunk at a time (a row of A or a column of B).

    A learned rank embedding (with the A/B embedding) selects the chunk, so the output Linear
    is only ``max(in, out)`` wide: r times smaller than ``SharedHead``'s. Rows are
    (sample, layer, A|B, rank). A per-rank trainable bias would cost as much as the layer it
    replaces, so PEFT's A init is a fixed buffer added to the A chunks instead.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int):
        widths = {m: max(i, o) for m, (i, o) in shapes.shapes.items()}
        super().__init__(latent_size, shapes, rank, widths)
        self.rank_emb = nn.Parameter(torch.randn(len(self.module_names), rank, latent_size))
        self.bias = nn.ParameterList(
            nn.Parameter(torch.zeros(2, widths[m], device=self.ab_emb.device)) for m in self.module_names
        )
        for i, (in_f, _) in enumerate(shapes.shapes.values()):
            self.register_buffer(f"a_init_{i}", peft_a_init(rank, in_f, self.ab_emb.device))

    def forward(self, features: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, latent] -> A [rows, r, in], B [rows, out, r]."""
        i = self.index(module)
        in_f, out_f = self.shapes.shapes[module]
        h = self.ab_features(features[:, None, :] + self.rank_emb[i], i)  # [rows, r, 2, latent]
        y = self.out[i](h) * self.gain[i][:, None] + self.bias[i]  # [rows, r, 2, max]
        a = y[:, :, 0, :in_f] + getattr(self, f"a_init_{i}")
        return a, y[:, :, 1, :out_f].transpose(1, 2)
