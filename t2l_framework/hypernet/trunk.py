"""The hypernetwork trunk: (task embedding, layer depth, module type) -> features for a head.

Structure and dropout placement follow the T2L reference (SakanaAI/text-to-lora,
``HyperModulator``; its names in brackets): the task embedding goes through Linear + LayerNorm
to ``task_dim`` [task_encoder]; learned layer-depth and module-type embeddings (Embedding +
LayerNorm each) [layer_depth_encoder, layer_type_encoder] are concatenated with it into the
trunk width (``task_dim + layer_emb_dim + module_emb_dim``, 128 by default) [the reference's
``latent_size``], mixed by an MLP [mixer], refined by ``n_residual_blocks`` pre-LayerNorm
residual MLPs [mlp1, mlp2] and projected to ``latent_size`` (the head's input width)
[mlp3, ``head_in_size``].

The trunk stops *before its last residual block*: the paper's M and S heads add their A/B and
rank embeddings there and run the last block and the output MLP once per A/B (and rank), so
each head finishes the trunk itself (``finish``, or ``last_block`` and ``out`` separately).
With the defaults and a 1024-d task embedding the trunk has 791,552 parameters.
"""

from __future__ import annotations

import torch
from torch import nn



class ResidualMLP(nn.Module):
    """x + Dropout(SiLU(Linear(Dropout(SiLU(Linear(LayerNorm(x))))))), width-preserving
    (the reference's ``MLPResidualBlock`` with pre-LayerNorm and post-dropout)."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, width), nn.SiLU(), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., width] -> [..., width]."""
        return x + self.mlp(x)


class Trunk(nn.Module):
    """Shared body of every head.

    enc_dim: task-embedding width (encoder output). n_layers, n_modules: how many layer depths
    and module types get embeddings. Other sizes come from ``HypernetConfig``.
    """

    def __init__(self, enc_dim: int, n_layers: int, n_modules: int, task_dim: int = 64,
                 layer_emb_dim: int = 32, module_emb_dim: int = 32, latent_size: int = 512,
                 n_residual_blocks: int = 2, dropout: float = 0.05, expansion: int = 4):
        super().__init__()
        assert n_residual_blocks >= 1, "the heads condition the last block"  # HypernetConfig checks the value
        self.latent_size = latent_size
        self.task_proj = nn.Sequential(nn.Linear(enc_dim, task_dim), nn.LayerNorm(task_dim))
        self.layer_emb = nn.Sequential(nn.Embedding(n_layers, layer_emb_dim), nn.LayerNorm(layer_emb_dim))
        self.module_emb = nn.Sequential(nn.Embedding(n_modules, module_emb_dim), nn.LayerNorm(module_emb_dim))
        width = task_dim + layer_emb_dim + module_emb_dim
        self.width = width
        self.mixer = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(width, width * expansion), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(width * expansion, width), nn.SiLU(), nn.Dropout(dropout),
        )
        self.blocks = nn.Sequential(*[ResidualMLP(width, width * expansion, dropout)
                                      for _ in range(n_residual_blocks)])
        self.out = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width * expansion), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(width * expansion, latent_size), nn.SiLU(),
        )

    @classmethod
    def from_config(cls, cfg, enc_dim: int, n_layers: int, n_modules: int) -> "Trunk":
        """Build from a ``HypernetConfig``."""
        return cls(enc_dim, n_layers, n_modules, cfg.task_dim, cfg.layer_emb_dim, cfg.module_emb_dim,
                   cfg.latent_size, cfg.n_residual_blocks, cfg.dropout)

    @property
    def last_block(self) -> ResidualMLP:
        """The residual block the heads run themselves (the reference's ``mlp2``): [..., width] -> same."""
        return self.blocks[-1]

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of the trunk for ``forward``'s features: x [..., width] -> [..., latent_size]."""
        return self.out(self.last_block(x))

    def forward(self, task_emb: torch.Tensor, layer_idx: torch.Tensor, module_idx: torch.Tensor) -> torch.Tensor:
        """Features for every (sample, module, layer) combination in one pass, up to (not
        including) the last residual block.

        task_emb: [batch, enc_dim]; layer_idx: LongTensor [n_layers]; module_idx: LongTensor [n_modules].
        Returns [n_modules, batch, n_layers, width]: module-major, so each head gets a
        contiguous ``[batch * n_layers, width]`` block without a copy.
        """
        b, m, n = task_emb.shape[0], module_idx.shape[0], layer_idx.shape[0]
        # Embed each distinct thing once and broadcast: the modules*batch*layers rows exist only
        # from the concatenation on.
        task = self.task_proj(task_emb)[None, :, None, :].expand(m, b, n, -1)
        module = self.module_emb(module_idx)[:, None, None, :].expand(m, b, n, -1)
        layer = self.layer_emb(layer_idx)[None, None, :, :].expand(m, b, n, -1)
        x = self.mixer(torch.cat([task, layer, module], dim=-1))
        return self.blocks[:-1](x)
