"""Arrow routing (Ostapenko et al. 2024): mix a library of task LoRAs per token, with no description.

For each library LoRA (an *expert*) and each LoRA layer, the prototype is the top right-singular
vector of delta W = B A (out x in): the input direction the expert changes most. A token whose
layer input x lines up with it is routed to that expert:

    logits_e = |<x, p_e>| / temperature      (the sign of a singular vector is arbitrary)
    w = softmax over the top-k logits (0 elsewhere; k <= 0: all experts)
    y = base(x) + sum_e w_e * scaling_e * B_e A_e x

The defaults are microsoft/mttl's ``arrow_router``: temperature 1, every expert (top_k -1);
its paper's experiments route to the top 4. Prototypes come from the thin factors (QR of A^T
and B, then the SVD of the r x r core), never from the full out x in matrix.
``LoraInjection.use_arrow`` applies a library to the frozen model (``lora/batched.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from t2l_framework.errors import T2LError
from t2l_framework.lora.peft_io import import_peft_adapter
from t2l_framework.lora.weights import LoraWeights, ModuleShapes
from t2l_framework.run_folder import PEFT_CONFIG

ARROW_TOP_K = -1  # mttl's ArrowSelectorConfig: route over every expert
ARROW_TEMPERATURE = 1.0  # mttl's router_temp


def arrow_prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Unit top right-singular vector of B @ A, from the factors: A [..., r, in], B [..., out, r] -> [..., in].

    B A = Q_b (R_b R_a^T) Q_a^T with A^T = Q_a R_a and B = Q_b R_b (thin QR), so its right
    singular vectors are Q_a times those of the small core R_b R_a^T. Computed in float32 at least.
    """
    dtype = torch.promote_types(A.dtype, torch.float32)
    q_a, r_a = torch.linalg.qr(A.to(dtype).transpose(-1, -2))  # [..., in, k], [..., k, r]
    q_b, r_b = torch.linalg.qr(B.to(dtype))  # [..., out, k'], [..., k', r]
    _, _, vh = torch.linalg.svd(r_b @ r_a.transpose(-1, -2))  # core [..., k', k]
    return (q_a @ vh[..., 0, :, None]).squeeze(-1)


def arrow_routing(x: torch.Tensor, prototypes_t: torch.Tensor, top_k: int = ARROW_TOP_K,
                  temperature: float = ARROW_TEMPERATURE) -> torch.Tensor:
    """Per-token expert weights: x [tokens, in], prototypes_t [in, E] -> [tokens, E] (float32).

    Rows sum to 1; outside a token's top-k experts the weight is exactly 0.
    """
    logits = (x.float() @ prototypes_t.float()).abs() / temperature
    n_experts = logits.shape[-1]
    if 0 < top_k < n_experts:
        top, idx = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, top)
    return logits.softmax(dim=-1)


@dataclass
class ArrowLibrary:
    """A library of task LoRAs ready for Arrow routing.

    names: one per expert (the adapter folder's name). experts: every adapter as one row,
    A[m]: [E, n_layers, r, in_m], B[m]: [E, n_layers, out_m, r], each expert's own scaling
    folded into its B (so ``experts.scaling`` is 1). prototypes[m]: [E, n_layers, in_m], float32.
    top_k: experts per token (<= 0 or >= E: all). temperature: divides the logits (> 0).
    """

    names: list[str]
    experts: LoraWeights
    prototypes: dict[str, torch.Tensor]
    top_k: int = ARROW_TOP_K
    temperature: float = ARROW_TEMPERATURE

    def __post_init__(self):
        if not self.temperature > 0:
            raise T2LError(f"Arrow temperature must be > 0, got {self.temperature}")

    @property
    def modules(self) -> list[str]:
        return list(self.prototypes)

    @classmethod
    def from_weights(cls, names: list[str], experts: LoraWeights, top_k: int = ARROW_TOP_K,
                     temperature: float = ARROW_TEMPERATURE) -> "ArrowLibrary":
        """From E adapters stacked as one LoraWeights (A[m]: [E, n_layers, r, in_m]); prototypes computed here."""
        shapes = ModuleShapes(experts.n_layers, {m: (a.shape[-1], experts.B[m].shape[-2]) for m, a in experts.A.items()})
        experts = experts.conform(shapes, experts.rank)  # scaling folded into B
        protos = {m: arrow_prototypes(experts.A[m], experts.B[m]) for m in experts.modules}
        return cls(list(names), experts, protos, int(top_k), float(temperature))

    def to(self, *args, **kwargs) -> "ArrowLibrary":
        return replace(self, experts=self.experts.to(*args, **kwargs),
                       prototypes={m: p.to(*args, **kwargs) for m, p in self.prototypes.items()})

    def check_fits(self, shapes: ModuleShapes, what: str = "the model") -> None:
        """T2LError unless every library module exists in ``shapes`` with the same layers and sizes."""
        for m in self.modules:
            have = (self.experts.n_layers, self.experts.A[m].shape[-1], self.experts.B[m].shape[-2])
            want = shapes.shapes.get(m)
            if want is None or have != (shapes.n_layers, *want):
                raise T2LError(f"the Arrow library's '{m}' LoRAs ({have[0]} layers, in {have[1]}, out {have[2]}) "
                               f"do not fit {what} ({shapes.n_layers} layers, modules {shapes.shapes})")


def load_arrow_library(folder: str | Path, top_k: int = ARROW_TOP_K,
                       temperature: float = ARROW_TEMPERATURE) -> ArrowLibrary:
    """An ``ArrowLibrary`` from a folder with one PEFT adapter folder per task (``data.lora_library``'s layout).

    Each adapter goes through ``import_peft_adapter``'s checks; they must share target modules
    and layer count, and may differ in rank (zero-padded) and scaling (each keeps its own).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise T2LError(f"Arrow library '{folder}' is not a folder")
    dirs = sorted(p for p in folder.iterdir() if (p / PEFT_CONFIG).is_file())
    if not dirs:
        raise T2LError(f"Arrow library '{folder}' holds no PEFT adapter folders (TASK/{PEFT_CONFIG})")
    adapters = [import_peft_adapter(d) for d in dirs]
    first = adapters[0]
    shapes = ModuleShapes(first.n_layers, {m: (a.shape[-1], first.B[m].shape[-2]) for m, a in first.A.items()})
    rank = max(w.rank for w in adapters)
    for d, w in zip(dirs, adapters):
        if set(w.modules) != set(first.modules) or any(w.A[m].shape[-1] != first.A[m].shape[-1] or
                                                       w.B[m].shape[-2] != first.B[m].shape[-2] or
                                                       w.n_layers != first.n_layers for m in w.modules):
            raise T2LError(f"Arrow library: adapter '{d}' targets other modules or shapes than '{dirs[0]}'")
    experts = LoraWeights.cat([w.conform(shapes, rank) for w in adapters])
    return ArrowLibrary.from_weights([d.name for d in dirs], experts, top_k, temperature)
