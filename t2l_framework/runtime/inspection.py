"""Why a description gives the adapter it gives: its nearest training descriptions and tasks in
the encoder's space, how familiar it is, and how its adapter compares with the training tasks'.

Familiarity: a description's similarity to the training tasks is its largest cosine to a
training description. The reference distribution is that same number for the *held-out*
descriptions of the training tasks (never trained on, but of tasks the hypernetwork knows);
the familiarity is the percentile of the description within it (50 = as close as a typical
held-out description of a training task, 0 = farther than all of them).

Adapters are compared as delta W = s * B @ A without forming a matrix:
<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)), so a norm or cosine costs r x r products. The
closest training adapters are ranked by the cosine of what sets each adapter apart from the
adapter of the training tasks' mean embedding (adapters of one hypernetwork share most of
their weights, so their plain cosines are all near 1); the plain cosine is reported too.
``InspectIndex`` holds what is computed once per run (``assembly/inspect.py`` builds and caches it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from t2l_framework.lora.weights import LoraWeights

FAMILIAR_FROM = 25.0  # percentile at or above which a description reads as familiar
UNFAMILIAR_BELOW = 5.0  # below this, farther than 95% of held-out descriptions of training tasks


@dataclass
class InspectIndex:
    """Per run: training descriptions, the held-out reference, the training tasks' adapters.

    task_ids: [T] training tasks; descriptions: [N] training descriptions; desc_task: [N] long
    (index into task_ids); embeddings: [N, d] unit rows; heldout_similarity: [H] largest
    cosine of each held-out description of a training task to the training descriptions;
    task_embeddings: [T, d] the encoder-space centroid of each task's training descriptions,
    at the encoder's own norm (what the hypernetwork takes); task_norms: [T, L, M] ||delta W||_F
    of each task's centroid adapter, modules in ``modules`` order.
    """

    task_ids: list[str]
    descriptions: list[str]
    desc_task: torch.Tensor
    embeddings: torch.Tensor
    heldout_similarity: torch.Tensor
    task_embeddings: torch.Tensor
    task_norms: torch.Tensor
    modules: list[str]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"desc_task": self.desc_task, "embeddings": self.embeddings,
                "heldout_similarity": self.heldout_similarity, "task_embeddings": self.task_embeddings,
                "task_norms": self.task_norms}


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1: [n, d] -> [n, d]."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def familiarity(similarity: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Percentile of each similarity [n] among the reference similarities [H]: [n] in 0..100."""
    return (reference[None, :] <= similarity[:, None]).float().mean(dim=1) * 100.0


def verdict(percentile: float) -> str:
    """The plain-words reading of a familiarity percentile."""
    if percentile >= FAMILIAR_FROM:
        return "familiar: as close to the training tasks as most held-out descriptions of training tasks"
    if percentile >= UNFAMILIAR_BELOW:
        return ("borderline: farther from the training tasks than most held-out descriptions of training tasks; "
                "check the nearest tasks")
    return ("unfamiliar: farther from every training task than 95% of held-out descriptions of training tasks; "
            "the adapter is an extrapolation")


def gram_inner(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F per leading index, from the factors.

    A*: [..., r, in], B*: [..., out, r] (same leading dims, broadcast) -> [...]:
    trace((B1^T B2)(A2 A1^T)), two r x r products instead of an out x in matrix.
    """
    bb = B1.transpose(-1, -2).float() @ B2.float()  # [..., r1, r2]
    aa = A2.float() @ A1.transpose(-1, -2).float()  # [..., r2, r1]
    return (bb * aa.transpose(-1, -2)).sum(dim=(-1, -2))


def layer_norms(weights: LoraWeights, modules: Sequence[str]) -> torch.Tensor:
    """||delta W||_F (scaling included) per sample, layer and module: [batch, L, M]."""
    out = [gram_inner(weights.A[m], weights.B[m], weights.A[m], weights.B[m]).clamp_min(0).sqrt()
           for m in modules]
    return torch.stack(out, dim=-1) * abs(weights.scaling)


def adapter_inner(x: LoraWeights, y: LoraWeights, modules: Sequence[str]) -> torch.Tensor:
    """<delta W_x, delta W_y> over all layers and modules (scaling left out): batch 1 against
    batch T broadcasts to [T]; equal batches pair row by row."""
    return sum(gram_inner(x.A[m], x.B[m], y.A[m], y.B[m]).sum(dim=-1) for m in modules)


def adapter_cosine(query: LoraWeights, others: LoraWeights, modules: Sequence[str],
                   anchor: LoraWeights | None = None) -> torch.Tensor:
    """Cosine between the whole delta W of ``query`` (batch 1) and each adapter of ``others``
    (batch T), all layers and modules as one vector: [T].

    anchor (batch 1): compare what sets each adapter apart from it, cos(q - a, t - a), expanded
    into inner products of the factors (<q-a, t-a> = <q,t> - <q,a> - <a,t> + <a,a>), so the
    differences are never formed either."""
    qt, qq, tt = (adapter_inner(query, others, modules), adapter_inner(query, query, modules),
                  adapter_inner(others, others, modules))
    if anchor is not None:
        qa, ta, aa = (adapter_inner(query, anchor, modules), adapter_inner(anchor, others, modules),
                      adapter_inner(anchor, anchor, modules))
        qt, qq, tt = qt - qa - ta + aa, qq - 2 * qa + aa, tt - 2 * ta + aa
    return qt / (qq.clamp_min(1e-30).sqrt() * tt.clamp_min(1e-30).sqrt())


def adapter_spread(weights: LoraWeights, modules: Sequence[str]) -> float:
    """The share of the adapters' delta-W energy that is not their mean: 1 - ||mean||^2 / mean ||dW_i||^2.

    0 when every adapter is the same (the hypernetwork ignores its input), 1 - 1/n for n
    orthogonal adapters of equal norm. From the Gram matrix of all pairs, so no delta W is formed.
    """
    n = weights.A[modules[0]].shape[0]
    if n < 2:
        raise ValueError("the spread of adapters needs at least two of them")
    gram = sum(gram_inner(weights.A[m][:, None], weights.B[m][:, None], weights.A[m][None], weights.B[m][None])
               .sum(dim=-1) for m in modules)  # [n, n]
    energy = gram.diagonal().mean()
    return float(1.0 - gram.mean() / energy) if energy > 0 else 0.0


class Inspector:
    """Inspection of descriptions for one ``AdapterGenerator`` and its ``InspectIndex``.

    chunk: training-task adapters generated at once when comparing (memory: chunk adapters).
    """

    def __init__(self, generator, index: InspectIndex, chunk: int = 32):
        self.generator, self.index, self.chunk = generator, index, chunk

    @torch.inference_mode()
    def embed(self, descriptions: Sequence[str]) -> torch.Tensor:
        """Unit embeddings of the descriptions: [n, d] on the CPU."""
        return unit(self.generator.encoder.encode(list(descriptions)).cpu())

    def neighbours(self, emb: torch.Tensor, k: int = 5) -> list[dict]:
        """Per unit embedding [n, d]: nearest descriptions and tasks, similarity and familiarity."""
        idx = self.index
        sims = emb @ idx.embeddings.T  # [n, N]
        per_task = torch.full((emb.shape[0], len(idx.task_ids)), -2.0).scatter_reduce(
            1, idx.desc_task.expand(emb.shape[0], -1), sims, reduce="amax")  # [n, T]
        best = sims.max(dim=1).values
        pct = familiarity(best, idx.heldout_similarity)
        out = []
        for i in range(emb.shape[0]):
            top_d = sims[i].topk(min(k, sims.shape[1]))
            top_t = per_task[i].topk(min(k, per_task.shape[1]))
            out.append({
                "similarity": round(float(best[i]), 4), "familiarity": round(float(pct[i]), 1),
                "verdict": verdict(float(pct[i])),
                "nearest_descriptions": [{"task": idx.task_ids[int(idx.desc_task[j])], "description": idx.descriptions[j],
                                          "cosine": round(float(c), 4)} for c, j in zip(top_d.values, top_d.indices)],
                "nearest_tasks": [{"task": idx.task_ids[int(j)], "cosine": round(float(c), 4)}
                                  for c, j in zip(top_t.values, top_t.indices)],
            })
        return out

    def familiarity(self, descriptions: Sequence[str], k: int = 3) -> list[dict]:
        """The short form for the server and ``t2l generate``: familiarity, verdict, nearest tasks."""
        return [{key: row[key] for key in ("familiarity", "verdict", "similarity", "nearest_tasks")}
                for row in self.neighbours(self.embed(descriptions), k)]

    @torch.inference_mode()
    def task_adapters(self, start: int, stop: int) -> LoraWeights:
        """The centroid adapters of training tasks start..stop (batch stop - start)."""
        hyper = self.generator.hypernet
        return hyper(self.index.task_embeddings[start:stop].to(hyper.layer_idx.device))

    @torch.inference_mode()
    def anchor(self) -> LoraWeights:
        """The adapter of the training tasks' mean embedding (batch 1): what all of them share."""
        emb = self.index.task_embeddings
        mean = unit(emb.mean(dim=0, keepdim=True)) * emb.norm(dim=1).mean()
        hyper = self.generator.hypernet
        return hyper(mean.to(hyper.layer_idx.device))

    @torch.inference_mode()
    def inspect(self, descriptions: Sequence[str], k: int = 5) -> list[dict]:
        """Everything about each description: neighbours, familiarity, its adapter's norms per layer
        and module against the training tasks' range, and the training tasks with the closest adapters."""
        idx, modules = self.index, self.index.modules
        rows = self.neighbours(self.embed(descriptions), k)
        weights = self.generator.adapters(list(descriptions))
        norms = layer_norms(weights, modules).cpu()  # [n, L, M]
        lo, hi = idx.task_norms.min(dim=0).values, idx.task_norms.max(dim=0).values  # [L, M]
        cos = torch.empty(len(rows), len(idx.task_ids))
        raw = torch.empty(len(rows), len(idx.task_ids))
        anchor = self.anchor()
        for start in range(0, len(idx.task_ids), self.chunk):
            stop = min(start + self.chunk, len(idx.task_ids))
            others = self.task_adapters(start, stop)
            for i in range(len(rows)):
                cos[i, start:stop] = adapter_cosine(weights.select(i), others, modules, anchor).cpu()
                raw[i, start:stop] = adapter_cosine(weights.select(i), others, modules).cpu()
        for i, row in enumerate(rows):
            outside = ((norms[i] < lo) | (norms[i] > hi))
            top = cos[i].topk(min(k, cos.shape[1]))
            row.update({
                "description": descriptions[i],
                "modules": list(modules),
                "norms": [[round(float(v), 5) for v in layer] for layer in norms[i]],
                "training_norm_range": {"min": [[round(float(v), 5) for v in layer] for layer in lo],
                                        "max": [[round(float(v), 5) for v in layer] for layer in hi]},
                "norms_outside_training_range": int(outside.sum()),
                "closest_adapters": [{"task": idx.task_ids[int(j)], "cosine": round(float(c), 4),
                                      "raw_cosine": round(float(raw[i, j]), 4)}
                                     for c, j in zip(top.values, top.indices)],
            })
        return rows
