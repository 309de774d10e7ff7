"""Output heads: trunk features -> LoRA factors A and B for one module type.

The built-in heads are the paper's L, M and S exactly as the T2L reference code defines them
(SakanaAI/text-to-lora, ``HyperModulator._hypernet_forward``), including its init for SFT:
every output Linear starts with zero weights and a bias that holds PEFT's default ``lora_A``
init (kaiming-uniform, U(+-1/sqrt(in))), so at step 0 each head emits the same A (and, for
M and S, a non-zero B) for every task, and the trunk starts learning once the head's weights
have moved off zero.

The contract (``HypernetHead``) is small so research users can write their own head and
name it in a recipe (``hypernet.head: mypkg.heads:MyHead``) or register it through a plugin.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from t2l_framework.errors import T2LError
from t2l_framework.lora.weights import ModuleShapes

ROTARY_BASE = 10000.0


def peft_a_init(rank: int, in_features: int, device=None) -> torch.Tensor:
    """PEFT's default ``lora_A`` init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in)), [rank, in]."""
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(rank, in_features, device=device).uniform_(-bound, bound)


class HypernetHead(nn.Module, abc.ABC):
    """Base class of all heads.

    A subclass implements two things:

    - ``__init__(latent_size, shapes, rank, trunk_width)`` (extra arguments need defaults).
      ``latent_size``: width of the trunk's output (the head input); ``trunk_width``: width of
      the trunk's inner features (for heads that add embeddings inside the trunk);
      ``shapes.shapes``: ``{module: (in_features, out_features)}``. Heads that read more
      recipe keys override the classmethod ``from_config`` (see ``ChunkedHead``).
    - ``forward(features, module, trunk) -> (A, B)``:

      * ``features``: ``[rows, trunk_width]``, the trunk's features *before its last residual
        block*; every row is for module type ``module``; rows are (sample, layer) pairs,
        sample-major (``rows = batch * n_layers``).
      * ``trunk``: the ``Trunk``. A head that does not condition the trunk's middle starts
        with ``h = trunk.finish(features)`` (``[rows, latent_size]``); one that does (the
        paper's M and S) adds its embeddings to ``features`` and calls ``trunk.last_block``
        and ``trunk.out`` itself, on any leading shape.
      * returns ``A``: ``[rows, rank, in_features]`` and ``B``: ``[rows, out_features, rank]``
        (PEFT's convention, delta W = scaling * B @ A).

    ``HyperNetwork`` calls the head once per module type (each has its own shapes), never per
    layer or per sample, so a head must be vectorised over rows.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, trunk_width: int):
        super().__init__()
        self.latent_size = latent_size
        self.trunk_width = trunk_width
        self.shapes = shapes
        self.rank = rank
        self.module_names = list(shapes.modules)
        self._index = {m: i for i, m in enumerate(self.module_names)}

    @classmethod
    def from_config(cls, hypernet_cfg: dict, shapes: ModuleShapes, rank: int, trunk_width: int) -> "HypernetHead":
        """Build from the ``hypernet`` recipe section (a dict); override to read head-specific keys."""
        return cls(int(hypernet_cfg["latent_size"]), shapes, rank, trunk_width)

    def index(self, module: str) -> int:
        """Position of module type ``module`` in ``shapes`` (and in this head's per-module lists)."""
        return self._index[module]

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, module: str, trunk: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Subclasses compute this (see the class docstring)."""


def _zero_weight_linear(in_size: int, out_size: int, bias: torch.Tensor) -> nn.Linear:
    """A Linear with zero weights and the given bias (the reference's SFT head init)."""
    layer = nn.Linear(in_size, out_size, device=bias.device)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(bias)
    return layer


class PerLayerHead(HypernetHead):
    """Paper's L: per module type one Linear emitting A and B together, ``r * (in + out)`` values.

    Output layout: the first ``r * in`` values are A, row-major ``[r, in]``; the rest are B,
    stored here out-major ``[out, r]`` (the reference stores them rank-major ``[r, out]``;
    ``reference_import`` permutes those rows). Init: bias = PEFT's A init for the A values,
    0 for the B values, so B == 0 and the adapted model equals the base model at step 0.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, trunk_width: int):
        super().__init__(latent_size, shapes, rank, trunk_width)
        self.out = nn.ModuleList()
        for in_f, out_f in shapes.shapes.values():
            bias = torch.cat([peft_a_init(rank, in_f).flatten(), torch.zeros(rank * out_f)])
            self.out.append(_zero_weight_linear(latent_size, rank * (in_f + out_f), bias))

    def forward(self, features: torch.Tensor, module: str, trunk: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, width] -> A [rows, r, in], B [rows, out, r]."""
        in_f, out_f = self.shapes.shapes[module]
        y = self.out[self.index(module)](trunk.finish(features))  # [rows, r * (in + out)]
        a, b = y.split([self.rank * in_f, self.rank * out_f], dim=-1)
        return a.unflatten(-1, (self.rank, in_f)), b.unflatten(-1, (out_f, self.rank))


class _ABConditionedHead(HypernetHead):
    """M and S: one output Linear per module type shared by A and B, told apart by a learned
    A/B embedding added inside the trunk, before its last residual block.

    ``ab_emb[module, 0|1]``: the A and B vectors of the trunk width (the reference's
    ``out_emb[module]["A"|"B"]``, init normal(0, 1)), through one LayerNorm shared by all
    modules (``out_emb_norm``). ``out[i]``: Linear(latent_size, out_size[module]) with zero
    weights and ``bias[module]``.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, trunk_width: int,
                 biases: dict[str, torch.Tensor]):
        super().__init__(latent_size, shapes, rank, trunk_width)
        self.ab_emb = nn.Parameter(torch.randn(len(self.module_names), 2, trunk_width))
        self.ab_norm = nn.LayerNorm(trunk_width)
        self.out = nn.ModuleList(_zero_weight_linear(latent_size, biases[m].numel(), biases[m])
                                 for m in self.module_names)

    def ab_features(self, features: torch.Tensor, i: int, trunk: nn.Module) -> torch.Tensor:
        """features [rows, width] -> last residual block of (features + A/B embedding): [rows, 2, width]."""
        return trunk.last_block(features.unsqueeze(-2) + self.ab_norm(self.ab_emb[i]))

    def _linear(self, h: torch.Tensor, i: int, keep: int) -> torch.Tensor:
        """h [..., latent] -> [..., keep]: the first ``keep`` outputs of ``out[i]`` only."""
        layer = self.out[i]
        return F.linear(h, layer.weight[:keep], layer.bias[:keep])


class SharedHead(_ABConditionedHead):
    """Paper's M: per module type one Linear of ``r * max(in, out)`` outputs, run on an A-row
    and a B-row per (sample, layer); each run is viewed ``[r, max]`` and A keeps the first
    ``in`` and B the first ``out`` columns.

    Init: zero weights and one bias shared by A and B: PEFT's A init / sqrt(2) in the first
    ``in`` columns of each rank row (0 elsewhere when out > in, where the reference would fail),
    so at step 0 B is non-zero: the adapted model already differs from the base model.
    """

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, trunk_width: int):
        biases = {}
        for m, (in_f, out_f) in shapes.shapes.items():
            bias = torch.zeros(rank, max(in_f, out_f))
            bias[:, :in_f] = peft_a_init(rank, in_f) / math.sqrt(2)
            biases[m] = bias.flatten()
        super().__init__(latent_size, shapes, rank, trunk_width, biases)

    def forward(self, features: torch.Tensor, module: str, trunk: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, width] -> A [rows, r, in], B [rows, out, r]."""
        i = self.index(module)
        in_f, out_f = self.shapes.shapes[module]
        h = trunk.out(self.ab_features(features, i, trunk))  # [rows, 2, latent]
        a = self._chunks(h[:, 0], i, in_f)  # [rows, r, in]
        b = self._chunks(h[:, 1], i, out_f)  # [rows, r, out]
        return a, b.transpose(1, 2)

    def _chunks(self, h: torch.Tensor, i: int, keep: int) -> torch.Tensor:
        """h [rows, latent] -> [rows, r, keep]: only the ``keep`` used columns of each of the r
        rank rows are computed (for v_proj's B that skips three quarters of the output layer)."""
        layer = self.out[i]
        width = layer.weight.shape[0] // self.rank
        weight = layer.weight.view(self.rank, width, -1)[:, :keep].reshape(self.rank * keep, -1)
        bias = layer.bias.view(self.rank, width)[:, :keep].reshape(-1)
        return F.linear(h, weight, bias).view(-1, self.rank, keep)


class ChunkedHead(_ABConditionedHead):
    """Paper's S: emits one rank-1 chunk at a time (a row of A, a column of B).

    The trunk's A/B features are repeated over the r rank positions, and the position enters
    before the last residual block: ``rotary`` (the paper's S; rotary embedding of the trunk
    width, base 10000, then the last block) or ``learned`` (``h + last_block(pos_emb(k))``,
    pos_emb = Embedding(r, width) + LayerNorm). The output Linear is only ``max(in, out)`` wide,
    r times smaller than M's; A keeps the first ``in`` and B the first ``out`` values of each
    chunk. Init: zero weights, one bias shared by A, B and all ranks: the first ``max(in, out)``
    values of PEFT's flattened A init / sqrt(2) / sqrt(r).
    """

    POSITIONS = ("rotary", "learned")

    def __init__(self, latent_size: int, shapes: ModuleShapes, rank: int, trunk_width: int,
                 position: str = "rotary"):
        if position not in self.POSITIONS:
            raise T2LError(f"hypernet.chunk_position: '{position}' is not allowed; expected one of: "
                           f"{', '.join(self.POSITIONS)}")
        if position == "rotary" and trunk_width % 2:
            raise T2LError(f"hypernet.chunk_position: rotary needs an even trunk width (task_dim + "
                           f"layer_emb_dim + module_emb_dim), got {trunk_width}")
        biases = {}
        for m, (in_f, out_f) in shapes.shapes.items():
            width = max(in_f, out_f)
            flat = peft_a_init(rank, in_f).flatten()[:width] / math.sqrt(2) / math.sqrt(rank)
            biases[m] = torch.cat([flat, torch.zeros(width - flat.numel())])
        super().__init__(latent_size, shapes, rank, trunk_width, biases)
        self.position = position
        if position == "learned":
            self.pos_emb = nn.Sequential(nn.Embedding(rank, trunk_width), nn.LayerNorm(trunk_width))
        self.register_buffer("rank_idx", torch.arange(rank), persistent=False)

    @classmethod
    def from_config(cls, hypernet_cfg: dict, shapes: ModuleShapes, rank: int, trunk_width: int) -> "ChunkedHead":
        """Reads ``hypernet.chunk_position`` besides the common arguments."""
        return cls(int(hypernet_cfg["latent_size"]), shapes, rank, trunk_width,
                   str(hypernet_cfg.get("chunk_position", "rotary")))

    def rotary(self, h: torch.Tensor) -> torch.Tensor:
        """Rotary position embedding over the rank axis: h [..., r, width] -> same (transformers'
        Llama rotary with default scaling: rotate-half, inv_freq = base^(-2k/width), in fp32)."""
        width = h.shape[-1]
        inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(0, width, 2, device=h.device).float() / width)
        angles = self.rank_idx.float()[:, None] * inv_freq[None, :]  # [r, width/2]
        angles = torch.cat([angles, angles], dim=-1)  # [r, width]
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        x1, x2 = h[..., : width // 2], h[..., width // 2:]
        return h * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, features: torch.Tensor, module: str, trunk: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [rows, width] -> A [rows, r, in], B [rows, out, r]."""
        i = self.index(module)
        in_f, out_f = self.shapes.shapes[module]
        h = self.ab_features(features, i, trunk)  # [rows, 2, width]
        h = h.unsqueeze(2).expand(-1, -1, self.rank, -1)  # [rows, 2, r, width]
        if self.position == "rotary":
            h = trunk.last_block(self.rotary(h))
        else:
            # [2, r, width]: one dropout mask per A/B, as the reference's two calls draw.
            pos = self.pos_emb(self.rank_idx).expand(2, -1, -1)
            h = h + trunk.last_block(pos)
        z = trunk.out(h)  # [rows, 2, r, latent]
        a = self._linear(z[:, 0], i, in_f)  # [rows, r, in]
        b = self._linear(z[:, 1], i, out_f)  # [rows, r, out]
        return a, b.transpose(1, 2)


# hypernet.head names of the built-in heads (the paper's L, M and S), registered as a plugin.
BUILTIN_HEADS: dict[str, type[HypernetHead]] = {"per_layer": PerLayerHead, "shared": SharedHead, "chunked": ChunkedHead}
