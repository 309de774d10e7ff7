"""How well a recon-trained T2L reproduces its LoRA library, per module type.

For every library task and description, the generated delta W = s B A is compared with the
library's: relative error ||dW - dW*||_F / ||dW*||_F per (task, description, layer), averaged per
module type, separately for the training descriptions and the held-out ones. Beside it, the
same error of the library's mean adapter (one adapter for every task: what a network that
ignores the description could at best do), so a number says how much of the task-specific part
was learned. Norms come from the factors (2r x 2r Gram matrices), never the out x in matrix.
"""

from __future__ import annotations

import json

import torch

from t2l_framework.atomic import write_text_atomic
from t2l_framework.lora.weights import LoraWeights


def delta_w_sq_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B @ A||_F^2 from A: [..., r, in], B: [..., out, r] -> [...], as tr((A A^T)(B^T B))."""
    return ((A @ A.mT) * (B.mT @ B)).sum((-2, -1))


def relative_errors(A: torch.Tensor, B: torch.Tensor, tA: torch.Tensor, tB: torch.Tensor) -> torch.Tensor:
    """||BA - tB tA||_F / ||tB tA||_F per leading index; A, tA: [..., r, in], B, tB: [..., out, r]."""
    diff = delta_w_sq_norm(torch.cat([A, tA], -2), torch.cat([B, -tB], -1)).clamp(min=0)
    return (diff / delta_w_sq_norm(tA, tB).clamp(min=1e-30)).sqrt()


@torch.no_grad()
def reconstruction_error(generator, embeddings: torch.Tensor, targets: LoraWeights, desc_sets: dict[str, list[list[int]]],
                         batch_size: int = 64) -> dict:
    """{split: {module: mean relative delta-W error}} plus ``mean_adapter`` (the library mean's error).

    generator: the hypernetwork (embeddings [n, enc_dim] -> LoraWeights); targets: the library,
    one row per task; desc_sets: split -> per task, the rows of ``embeddings`` to generate from.
    Both sides carry the same scaling, which cancels in a relative error.
    """
    generator.eval()
    device = embeddings.device
    out: dict = {}
    for split, per_task in desc_sets.items():
        pairs = [(t, d) for t, ds in enumerate(per_task) for d in ds]
        errs: dict[str, list[torch.Tensor]] = {m: [] for m in targets.modules}
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            tasks = torch.tensor([t for t, _ in chunk])
            gen = generator(embeddings[torch.tensor([d for _, d in chunk], device=device)]).to("cpu")
            for m in targets.modules:
                errs[m].append(relative_errors(gen.A[m].float(), gen.B[m].float(),
                                               targets.A[m][tasks].float(), targets.B[m][tasks].float()).flatten())
        out[split] = {m: round(float(torch.cat(e).mean()), 5) for m, e in errs.items()}
        out[split]["n_adapters"] = len(pairs)
    # The library's mean delta W M = mean_s dW_s against each task's: ||M - dW_t||^2 from the Gram
    # matrix G[s, t] = <dW_s, dW_t> = sum((A_s A_t^T) * (B_s^T B_t)) per layer: [n, n, L].
    best = {}
    for m in targets.modules:
        A, B = targets.A[m].float(), targets.B[m].float()  # [n, L, r, in], [n, L, out, r]
        G = (torch.einsum("slri,tlqi->stlrq", A, A) * torch.einsum("slor,tloq->stlrq", B, B)).sum((-2, -1))
        own = G.diagonal(dim1=0, dim2=1).T  # [n, L]: ||dW_t||^2
        sq = G.mean((0, 1))[None] - 2 * G.mean(0) + own
        best[m] = round(float((sq.clamp(min=0) / own.clamp(min=1e-30)).sqrt().mean()), 5)
    out["mean_adapter"] = best
    return out


def write_recon_report(run, generator, embeddings: torch.Tensor, datamodule) -> dict:
    """Reconstruction error of a finished recon run into ``report.json`` / ``report.md`` of its folder."""
    result = reconstruction_error(generator, embeddings, datamodule.targets,
                                  {"train_descriptions": datamodule.train_desc, "heldout_descriptions": datamodule.val_desc})
    result["tasks"] = list(datamodule.task_ids)
    write_text_atomic(run.report_json, json.dumps({"reconstruction": result}, indent=1) + "\n")
    modules = list(datamodule.targets.modules)
    lines = ["**Reconstruction of the LoRA library** (relative error of delta W, ||dW - dW*||_F / ||dW*||_F, "
             f"mean over {len(datamodule.task_ids)} tasks, their descriptions and layers)", "",
             "| adapters from | " + " | ".join(modules) + " |", "|---|" + "---:|" * len(modules)]
    names = {"train_descriptions": "training descriptions", "heldout_descriptions": "held-out descriptions",
             "mean_adapter": "the library's mean delta W (no task information)"}
    for key, label in names.items():
        lines.append(f"| {label} | " + " | ".join(f"{result[key][m]:.4f}" for m in modules) + " |")
    write_text_atomic(run.report_md, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
