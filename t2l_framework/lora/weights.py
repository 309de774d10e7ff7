"""The hand-off format between the hypernetwork and the LoRA code.

A ``LoraWeights`` holds, for each targeted module type (``q_proj``, ``v_proj``, ...), the
per-sample LoRA factors of every layer, in PEFT's convention delta W = scaling * B @ A with
scaling = alpha / sqrt(r) (rsLoRA, what T2L trains and saves) or alpha / r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ModuleShapes:
    """What a hypernetwork must generate for one base model.

    n_layers: number of transformer layers carrying a LoRA.
    shapes: module type -> (in_features, out_features), in target order.
    """

    n_layers: int
    shapes: dict[str, tuple[int, int]]

    @property
    def modules(self) -> list[str]:
        return list(self.shapes)

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleShapes":
        return cls(int(d["n_layers"]), {k: (int(v[0]), int(v[1])) for k, v in d["shapes"].items()})


@dataclass
class LoraWeights:
    """Per-sample LoRA factors for every targeted module.

    A[m]: [batch, n_layers, rank, in_m]; B[m]: [batch, n_layers, out_m, rank].
    use_rslora: scaling is alpha / sqrt(rank) (PEFT's ``use_rslora``) instead of alpha / rank.
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def with_factors(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor]) -> "LoraWeights":
        """The same adapter settings (rank, alpha, rsLoRA) over other factors."""
        return replace(self, A=A, B=B)

    def detach(self) -> "LoraWeights":
        return self.with_factors({m: a.detach() for m, a in self.A.items()}, {m: b.detach() for m, b in self.B.items()})

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    @property
    def batch_size(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def n_layers(self) -> int:
        return next(iter(self.A.values())).shape[1]

    def select(self, index: int | slice | torch.Tensor) -> "LoraWeights":
        """A sub-batch (``index`` int keeps a batch dim of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.with_factors({m: a[index] for m, a in self.A.items()}, {m: b[index] for m, b in self.B.items()})

    def to(self, *args, **kwargs) -> "LoraWeights":
        return self.with_factors({m: a.to(*args, **kwargs) for m, a in self.A.items()},
                                 {m: b.to(*args, **kwargs) for m, b in self.B.items()})

    @staticmethod
    def cat(items: list["LoraWeights"]) -> "LoraWeights":
        """Concatenate along the batch dimension (used to mix adapters in one batch)."""
        first = items[0]
        if any(w.scaling != first.scaling for w in items):
            raise ValueError("LoraWeights.cat: adapters with different scalings; conform() them first")
        return first.with_factors({m: torch.cat([w.A[m] for w in items]) for m in first.A},
                                  {m: torch.cat([w.B[m] for w in items]) for m in first.B})

    def conform(self, shapes: ModuleShapes, rank: int) -> "LoraWeights":
        """The same adapters laid out for ``shapes`` at ``rank``, so different adapters can share a batch.

        Rank is zero-padded (extra rows of A and columns of B add nothing), modules the adapter
        lacks get zeros, and each adapter's scaling is folded into B (the result has scaling 1).
        """
        from t2l_framework.errors import T2LError

        extra = sorted(set(self.A) - set(shapes.shapes))
        if extra or self.n_layers != shapes.n_layers or rank < self.rank:
            raise T2LError(f"adapter with modules {self.modules}, {self.n_layers} layers and rank {self.rank} does not "
                           f"fit modules {shapes.modules}, {shapes.n_layers} layers, rank {rank}")
        A, B = {}, {}
        for m, (fan_in, fan_out) in shapes.shapes.items():
            a = self.A.get(m)
            ref = next(iter(self.A.values()))
            A[m] = ref.new_zeros(self.batch_size, shapes.n_layers, rank, fan_in)
            B[m] = ref.new_zeros(self.batch_size, shapes.n_layers, fan_out, rank)
            if a is not None:
                A[m][:, :, :self.rank] = a
                B[m][:, :, :, :self.rank] = self.B[m] * self.scaling
        return LoraWeights(A, B, rank, float(rank))


def stack_rows(rows: "list[LoraWeights | None]") -> "LoraWeights | None":
    """One LoraWeights for a batch whose row i uses adapter ``rows[i]`` (batch 1) or none.

    Returns None when no row has an adapter and the shared adapter itself when every row uses
    the same one (the cheap batch-1 path); otherwise rows are concatenated, zeros for None.
    """
    present = [w for w in rows if w is not None]
    if not present:
        return None
    if len(present) == len(rows) and all(w is present[0] for w in present):
        return present[0]
    zero = present[0].select(0)
    zero = zero.with_factors({m: torch.zeros_like(a) for m, a in zero.A.items()},
                             {m: torch.zeros_like(b) for m, b in zero.B.items()})
    return LoraWeights.cat([w.select(0) if w is not None else zero for w in rows])
