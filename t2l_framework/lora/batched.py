"""Batched per-sample LoRA on a frozen model: each sample of a batch may carry its own adapter.

``inject_lora`` wraps the targeted linear layers (``nn.Linear`` or transformers' ``Conv1D``) once; ``injection.use(weights)`` sets
the per-sample factors for the forward passes (or ``generate``) inside the ``with`` block:

    y = base(x) + scaling * (dropout(x) @ A^T) @ B^T,   x: [batch, seq, in], A: [batch, r, in], B: [batch, out, r]

computed with batched matmuls on [batch, seq, features]; the weights are never repeated per
token and the base weights are neither copied nor unfrozen. Gradients flow to A and B (and so
to the hypernetwork that produced them).

``dropout`` is PEFT's ``lora_dropout`` (the T2L reference trains with 0.05): dropout on the
layer input before A, only on the LoRA path, with its own mask in every wrapped layer. The
caller passes it only for training steps (``use(weights, dropout=p)``); at 0 the path is
exactly the plain one, with no extra tensor.

A fused projection (GPT-2's ``c_attn`` = q|k|v) carries one wrapper per logical target, nested,
each adding its delta to its own output slice only: ``y[..., slice] += scaling * x A^T B^T``.

Arrow mode (``injection.use_arrow(library)``, ``lora/arrow.py``): a layer also mixes E experts
per token, on top of (or instead of) the per-sample path. The E experts' factors are stacked
into one [in, E*r] and one [E*r, out] matrix, so all experts of all tokens cost two matmuls:

    y += ((x A_all^T) * repeat(w, r)) B_all^T,   w = arrow_routing(x): [tokens, E]
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from t2l_framework.errors import T2LError
from t2l_framework.lora.arrow import ArrowLibrary, arrow_routing
from t2l_framework.lora.targets import find_targets, layer_features, target_shapes, target_slices, unwrap
from t2l_framework.lora.weights import LoraWeights, ModuleShapes


class BatchedLoraLinear(nn.Module):
    """A linear layer plus a per-sample LoRA path; exactly the base layer when none is set.

    out_slice: the output columns the LoRA delta is added to (a fused layer's q or v part);
        None means the whole output, as in PEFT. B is then ``[b, len(slice), r]``.
    """

    def __init__(self, base_layer: nn.Module, out_slice: slice | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.out_slice = out_slice
        self.lora_A: torch.Tensor | None = None  # [b, r, in], as set
        self.lora_B: torch.Tensor | None = None  # [b, out (of the slice), r], as set
        self.scaling = 1.0
        self.dropout = 0.0  # probability of zeroing an input feature on the LoRA path only
        # What forward multiplies with, made once per set() rather than once per forward (a
        # decode step): in the layer's dtype, contiguous, transposed for plain matmuls, scaling
        # folded into B.
        self.a_t: torch.Tensor | None = None  # [b, in, r]
        self.b_t: torch.Tensor | None = None  # [b, r, out (of the slice)], times scaling
        # Arrow experts, shared by every row (set_experts): stacked factors and prototypes.
        self.experts_a: torch.Tensor | None = None  # [in, E * r]
        self.experts_b: torch.Tensor | None = None  # [E * r, out (of the slice)], each expert's scaling folded
        self.prototypes_t: torch.Tensor | None = None  # [in, E], float32
        self.top_k, self.temperature = -1, 1.0

    def set_factors(self, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float = 1.0,
                    dropout: float = 0.0) -> None:
        """Per-sample factors A: [b, r, in], B: [b, out, r] (None clears them), prepared once here."""
        self.lora_A, self.lora_B, self.scaling, self.dropout = A, B, scaling, dropout
        if A is None:
            self.a_t = self.b_t = None
            return
        dtype = self.weight.dtype if self.weight.is_floating_point() else A.dtype  # quantised bases: keep A's
        self.a_t = A.to(dtype).transpose(1, 2).contiguous()
        self.b_t = (B.to(dtype) * scaling).transpose(1, 2).contiguous()

    def set_experts(self, A: torch.Tensor | None, B: torch.Tensor | None = None,
                    prototypes: torch.Tensor | None = None, top_k: int = -1, temperature: float = 1.0) -> None:
        """Arrow experts for every row: A [E, r, in], B [E, out, r] (scaling folded in), prototypes
        [E, in]; None clears them. Stacked once here, not per forward."""
        if A is None:
            self.experts_a = self.experts_b = self.prototypes_t = None
            return
        n_experts, rank, fan_in = A.shape
        dtype = self.weight.dtype if self.weight.is_floating_point() else A.dtype
        self.experts_a = A.to(dtype).permute(2, 0, 1).reshape(fan_in, n_experts * rank).contiguous()
        self.experts_b = B.to(dtype).transpose(1, 2).reshape(n_experts * rank, B.shape[1]).contiguous()
        self.prototypes_t = prototypes.float().t().contiguous()
        self.top_k, self.temperature = int(top_k), float(temperature)

    def _add_experts(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[..., slice] += the routed mixture of the Arrow experts; x: [..., in], y: [..., out]."""
        a, b = self.experts_a, self.experts_b
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
        route = arrow_routing(flat, self.prototypes_t, self.top_k, self.temperature).to(x.dtype)  # [tokens, E]
        hidden = (flat @ a).view(flat.shape[0], route.shape[1], -1) * route[..., None]  # [tokens, E, r]
        out = y.view(-1, y.shape[-1])
        out = out if self.out_slice is None else out[:, self.out_slice]
        out.addmm_(hidden.flatten(1), b)  # [tokens, E*r] @ [E*r, out]

    @property
    def weight(self) -> torch.Tensor:  # code that inspects proj.weight keeps working
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return layer_features(unwrap(self))[0]

    @property
    def out_features(self) -> int:
        return layer_features(unwrap(self))[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, ..., in] -> [n, ..., out]."""
        y = self.base_layer(x)
        a_t, b_t = self.a_t, self.b_t
        if a_t is None and self.experts_a is None:
            return y
        y = y.contiguous()  # a no-op for nn.Linear; the in-place adds below need a plain view
        if self.experts_a is not None:  # routed on the undropped input (Arrow runs at inference)
            self._add_experts(x, y)
            if a_t is None:
                return y
        if a_t.dtype != x.dtype:  # e.g. under autocast; set_factors already cast to the weights' dtype
            a_t, b_t = a_t.to(x.dtype), b_t.to(x.dtype)
        n, b = x.shape[0], a_t.shape[0]
        if self.dropout > 0:  # base(x) above saw the undropped input, as in PEFT
            x = torch.nn.functional.dropout(x, self.dropout, training=True)
        # The LoRA path is added into the base output in place: Linear's backward does not
        # need its output, and this saves a pass over the largest tensor of the layer.
        if b == 1:  # one adapter for the whole batch: plain 2-D matmuls, like PEFT
            out = y.view(-1, y.shape[-1])
            out = out if self.out_slice is None else out[:, self.out_slice]
            out.addmm_(x.reshape(-1, x.shape[-1]) @ a_t[0], b_t[0])  # [tokens, r] @ [r, out]
            return y
        if n != b:
            if n % b:
                raise T2LError(f"LoRA weights carry {b} adapters but the input batch has {n} rows")
            # generate(num_beams=k / num_return_sequences=k) expands each prompt into k
            # consecutive rows (and beam reordering stays inside those groups).
            a_t, b_t = a_t.repeat_interleave(n // b, 0), b_t.repeat_interleave(n // b, 0)
        out = y.view(n, -1, y.shape[-1])
        out = out if self.out_slice is None else out[..., self.out_slice]
        out.baddbmm_(torch.bmm(x.reshape(n, -1, x.shape[-1]), a_t), b_t)  # [n, seq, r] @ [n, r, out]
        return y


@dataclass
class LoraInjection:
    """The wrapped layers of one model and what a hypernetwork must generate for them.

    layers: target -> one ``BatchedLoraLinear`` per decoder layer.
    paths: target -> module path per decoder layer (``model.layers.0.self_attn.q_proj``).
    slices: target -> output slice of its (fused) layer, None for a whole layer.
    """

    model: nn.Module
    layers: dict[str, list[BatchedLoraLinear]]
    paths: dict[str, list[str]]
    shapes: ModuleShapes
    slices: dict[str, slice | None] = field(default_factory=dict)

    def set(self, weights: LoraWeights | None, dropout: float = 0.0) -> None:
        """Set (or clear, with None) the per-sample adapters; prefer the ``use`` context."""
        if weights is None:
            for mods in self.layers.values():
                for mod in mods:
                    mod.set_factors(None, None)
            return
        assert 0.0 <= dropout < 1.0, dropout  # lora.dropout is checked with the recipe
        self._check(weights)
        for target, mods in self.layers.items():
            A, B = weights.A[target], weights.B[target]
            for i, mod in enumerate(mods):
                mod.set_factors(A[:, i], B[:, i], weights.scaling, dropout)

    @contextmanager
    def use(self, weights: LoraWeights, dropout: float = 0.0) -> Iterator[None]:
        """Apply ``weights`` (batch 1 = same adapter for every row) inside the block.

        weights.A[m]: [batch, n_layers, r, in_m]; weights.B[m]: [batch, n_layers, out_m, r].
        dropout: LoRA input dropout for this block (training steps only; 0 = none).
        """
        self.set(weights, dropout)
        try:
            yield
        finally:
            self.set(None)

    def set_arrow(self, library: ArrowLibrary | None) -> None:
        """Route every row's tokens over ``library``'s experts (None: stop); prefer ``use_arrow``.

        Modules the library has no LoRA for keep only the per-sample path.
        """
        if library is None:
            for mods in self.layers.values():
                for mod in mods:
                    mod.set_experts(None)
            return
        library.check_fits(self.shapes, "the injected model")
        for target in library.modules:
            A, B, P = library.experts.A[target], library.experts.B[target], library.prototypes[target]
            for i, mod in enumerate(self.layers[target]):
                mod.set_experts(A[:, i], B[:, i] * library.experts.scaling, P[:, i], library.top_k,
                                library.temperature)

    @contextmanager
    def use_arrow(self, library: ArrowLibrary) -> Iterator[None]:
        """Arrow routing over ``library`` inside the block (``lora/arrow.py``); per-sample adapters set
        with ``use`` inside it add to the mixture."""
        self.set_arrow(library)
        try:
            yield
        finally:
            self.set_arrow(None)

    def remove(self) -> nn.Module:
        """Put the original linear modules back; returns the model."""
        for target in self.layers:
            for path in self.paths[target]:  # fused targets share a path: unwrap every level
                parent, _, child = path.rpartition(".")
                setattr(self.model.get_submodule(parent), child, unwrap(self.model.get_submodule(path)))
        self.layers = {}
        return self.model

    def _check(self, weights: LoraWeights) -> None:
        missing = [t for t in self.shapes.shapes if t not in weights.A or t not in weights.B]
        if missing:
            raise T2LError(f"LoRA weights lack target modules {missing}; they carry {weights.modules}")
        for target, (fan_in, fan_out) in self.shapes.shapes.items():
            A, B = weights.A[target], weights.B[target]
            want_a = (self.shapes.n_layers, weights.rank, fan_in)
            want_b = (self.shapes.n_layers, fan_out, weights.rank)
            if tuple(A.shape[1:]) != want_a or tuple(B.shape[1:]) != want_b or A.shape[0] != B.shape[0]:
                raise T2LError(
                    f"LoRA weights for '{target}' have A {tuple(A.shape)} and B {tuple(B.shape)}; "
                    f"the model needs A [batch, {', '.join(map(str, want_a))}] and B [batch, {', '.join(map(str, want_b))}]"
                )


def inject_lora(model: nn.Module, target_modules: list[str], family=None) -> LoraInjection:
    """Wrap every targeted linear layer of ``model`` for batched per-sample LoRA.

    family: the ``ModelFamily`` whose ``fused_targets`` apply, as the assembly layer resolved it
    for the loaded base model (None: no fused projections).
    """
    shapes = target_shapes(model, target_modules, family)
    found = find_targets(model, target_modules, family)
    slices = target_slices(model, target_modules, family)
    if any(unwrap(mod) is not mod for mods in found.values() for _, mod in mods):
        raise T2LError("the model already carries LoRA wrappers; call remove() on the earlier injection first")
    layers: dict[str, list[BatchedLoraLinear]] = {}
    for target, mods in found.items():
        layers[target] = []
        for path, _ in mods:
            parent, _, child = path.rpartition(".")
            # Wrap what is there now: a second target of a fused layer wraps the first's wrapper.
            wrapped = BatchedLoraLinear(model.get_submodule(path), slices[target])
            setattr(model.get_submodule(parent), child, wrapped)
            layers[target].append(wrapped)
    paths = {t: [p for p, _ in mods] for t, mods in found.items()}
    return LoraInjection(model, layers, paths, shapes, slices)
