"""The reconstruction loss mean |s (B A - B* A*)| without holding the delta W of every layer.

Written plainly (``F.l1_loss(B @ A * s, B* @ A* * s)``) autograd keeps both out x in products
and their difference for every (sample, layer): about 80M floats a step on SmolLM2-135M's q/v
with 8 tasks, so a step is memory-bound (~1.2 s on 2 cores). Here the difference is formed a
few (sample, layer) matrices at a time, and the backward forms it again instead of storing it:
the same value and gradients, several times faster there (``benchmarks/recon_step.py``).
"""

from __future__ import annotations

import torch

# Entries of delta W per chunk: small enough to stay in cache, large enough for bmm.
_CHUNK_ELEMENTS = 1 << 20


def _difference(B, A, tB, tA, i: int, j: int) -> torch.Tensor:
    """s B A - s B* A* of the (sample, layer) matrices i:j (the scaling is in B and B*)."""
    return torch.baddbmm(torch.bmm(B[i:j], A[i:j]), tB[i:j], tA[i:j], alpha=-1)


class _DeltaWL1(torch.autograd.Function):
    """mean |B A - B* A*| over [N, out, r] @ [N, r, in] pairs, a chunk at a time both ways."""

    @staticmethod
    def forward(ctx, B, A, tB, tA) -> torch.Tensor:
        ctx.save_for_backward(B, A, tB, tA)
        n, out, size = B.shape[0], B.shape[1], A.shape[-1]
        ctx.chunk = max(1, _CHUNK_ELEMENTS // (out * size))
        total = B.new_zeros((), dtype=torch.float64)
        for i in range(0, n, ctx.chunk):
            total += _difference(B, A, tB, tA, i, i + ctx.chunk).abs_().sum(dtype=torch.float64)
        return (total / (n * out * size)).to(B.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        B, A, tB, tA = ctx.saved_tensors
        per_entry = grad / (B.shape[0] * B.shape[1] * A.shape[-1])
        want_t = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dB, dA = torch.empty_like(B), torch.empty_like(A)
        dtB, dtA = (torch.empty_like(tB), torch.empty_like(tA)) if want_t else (None, None)
        for i in range(0, B.shape[0], ctx.chunk):
            j = i + ctx.chunk
            s = _difference(B, A, tB, tA, i, j).sign_().mul_(per_entry)
            torch.bmm(s, A[i:j].mT, out=dB[i:j])
            torch.bmm(B[i:j].mT, s, out=dA[i:j])
            if want_t:
                torch.bmm(s, tA[i:j].mT, out=dtB[i:j]).neg_()
                torch.bmm(tB[i:j].mT, s, out=dtA[i:j]).neg_()
        return dB, dA, dtB, dtA


def delta_w_l1(A: torch.Tensor, B: torch.Tensor, tA: torch.Tensor, tB: torch.Tensor, scaling: float) -> torch.Tensor:
    """mean |s (B @ A - tB @ tA)| over every entry, as ``F.l1_loss(B @ A * s, tB @ tA * s)``.

    A, tA: [..., r, in]; B, tB: [..., out, r] (same leading shape; the ranks may differ);
    gradients reach A and B (and tA, tB if they require them).
    """
    if A.shape[:-2] != tA.shape[:-2] or A.shape[-1] != tA.shape[-1] or B.shape[:-1] != tB.shape[:-1]:
        raise ValueError(f"delta_w_l1: generated A {tuple(A.shape)} / B {tuple(B.shape)} do not match "
                         f"the targets' A {tuple(tA.shape)} / B {tuple(tB.shape)} in their leading and out dims")

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(0, -3).contiguous()

    return _DeltaWL1.apply(flat(B * scaling), flat(A), flat(tB * scaling), flat(tA))
