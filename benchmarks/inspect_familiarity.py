"""How well ``t2l inspect`` reads a trained run (default: the CPU demo run, runs/smollm2_demo).

1. Nearest task: each held-out description of each training task (never trained on) is placed
   in the encoder's space; top-1 / top-3 = its own task is the nearest / among the 3 nearest
   training tasks. Baseline in the same run: the same ranking with the task labels of the
   training descriptions shuffled (what a ranking that knows nothing about tasks scores).
2. Familiarity: the percentile of the held-out descriptions of training tasks (each one left
   out of the reference it is scored against) vs the descriptions of the run's never-trained
   eval tasks; mean, quartiles and the share of each verdict.
3. Adapter cosine from the factors (trace((B1^T B2)(A2 A1^T))) vs forming every delta W:
   the same numbers, and the time ratio, over the training tasks' adapters; plain and centred
   on the mean-task adapter (what ``closest_adapters`` ranks by).
4. The example PNG and JSON (docs/inspect_example.png) for one training-task and one unseen description.

    python benchmarks/inspect_familiarity.py [RUN] [--unseen-per-task 10] [--png docs/inspect_example.png]

The run folder is only read; the index is cached under $T2L_CACHE/inspect (~/.cache/t2l/inspect).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from t2l_framework.assembly.inspect import inspect_run, load_or_build_index, run_tasks
from t2l_framework.assembly.loading import load_adapter_generator
from t2l_framework.assembly.lookups import load_recipe
from t2l_framework.runtime.inspection import (
    UNFAMILIAR_BELOW, FAMILIAR_FROM, Inspector, adapter_cosine, familiarity,
)


def ranks(emb: torch.Tensor, own: list[int], train_emb: torch.Tensor, desc_task: torch.Tensor, n_tasks: int) -> list[int]:
    """Rank (0 = nearest) of each row's own task among tasks ordered by best description cosine."""
    sims = emb @ train_emb.T
    per_task = torch.full((emb.shape[0], n_tasks), -2.0).scatter_reduce(
        1, desc_task.expand(emb.shape[0], -1), sims, reduce="amax")
    order = per_task.argsort(dim=1, descending=True)
    return [int((order[i] == t).nonzero()[0]) for i, t in enumerate(own)]


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    share = lambda f: 100.0 * sum(f(v) for v in values) / len(values)  # noqa: E731
    return (f"mean {statistics.mean(values):5.1f}  quartiles {q[0]:5.1f} / {q[1]:5.1f} / {q[2]:5.1f}   "
            f"familiar {share(lambda v: v >= FAMILIAR_FROM):5.1f}%  borderline "
            f"{share(lambda v: UNFAMILIAR_BELOW <= v < FAMILIAR_FROM):5.1f}%  unfamiliar "
            f"{share(lambda v: v < UNFAMILIAR_BELOW):5.1f}%  (n={len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/smollm2_demo")
    parser.add_argument("--unseen-per-task", type=int, default=10, help="descriptions per never-trained task")
    parser.add_argument("--png", default="docs/inspect_example.png")
    parser.add_argument("--json", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    run = Path(args.run)
    cfg = load_recipe(run / "recipe.yaml", check_files=False)
    tasks = run_tasks(cfg, run / "recipe.yaml")
    generator = load_adapter_generator(run, "cpu")
    t0 = time.perf_counter()
    index = load_or_build_index(generator, tasks)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = load_or_build_index(generator, tasks)
    cached = time.perf_counter() - t0
    inspector = Inspector(generator, index)
    task_pos = {t: i for i, t in enumerate(index.task_ids)}
    print(f"run {run}: {len(index.task_ids)} training tasks, {len(index.descriptions)} training descriptions, "
          f"{len(index.heldout_similarity)} held-out; index {first:.1f} s first call, {cached:.2f} s cached")

    # 1. nearest task of held-out descriptions
    held = [(t, d) for t in index.task_ids for d in tasks.train[t][1]]
    held_emb = inspector.embed([d for _, d in held])
    own = [task_pos[t] for t, _ in held]
    r = ranks(held_emb, own, index.embeddings, index.desc_task, len(index.task_ids))
    shuffled = index.desc_task[torch.randperm(len(index.desc_task), generator=torch.Generator().manual_seed(args.seed))]
    r0 = ranks(held_emb, own, index.embeddings, shuffled, len(index.task_ids))
    first_of_task = {}
    for (t, _), rank in zip(held, r):
        first_of_task.setdefault(t, rank)
    top = lambda rs, k: 100.0 * sum(x < k for x in rs) / len(rs)  # noqa: E731
    print("\nnearest training task of a training task's own held-out description")
    print(f"  all held-out descriptions ({len(r)}): top-1 {top(r, 1):5.1f}%  top-3 {top(r, 3):5.1f}%")
    fr = list(first_of_task.values())
    print(f"  per task, its first held-out description ({len(fr)} tasks): top-1 {top(fr, 1):5.1f}%  "
          f"top-3 {top(fr, 3):5.1f}%")
    print(f"  baseline, task labels shuffled: top-1 {top(r0, 1):5.1f}%  top-3 {top(r0, 3):5.1f}%   "
          f"ratio top-1 {top(r, 1) / max(top(r0, 1), 1e-9):.1f}x, top-3 {top(r, 3) / max(top(r0, 3), 1e-9):.1f}x")
    missed = sorted({t for (t, _), rank in zip(held, r) if rank >= 3})
    if missed:
        print(f"  tasks with a held-out description outside the top 3: {', '.join(missed)}")

    # 2. familiarity: held-out descriptions of training tasks (leave-one-out) vs unseen tasks
    best = (held_emb @ index.embeddings.T).max(dim=1).values
    ref = index.heldout_similarity
    seen_pct = [float(familiarity(best[i:i + 1], torch.cat([ref[:i], ref[i + 1:]]))[0]) for i in range(len(best))]
    rng = random.Random(args.seed)
    unseen = [d for t in tasks.unseen for d in rng.sample(tasks.unseen[t], min(args.unseen_per_task,
                                                                               len(tasks.unseen[t])))]
    unseen_rows = inspector.neighbours(inspector.embed(unseen)) if unseen else []
    print("\nfamiliarity percentile (reference: held-out descriptions of training tasks)")
    print(f"  training tasks, held-out descriptions (leave-one-out): {summary(seen_pct)}")
    if unseen_rows:
        print(f"  never-trained eval tasks ({len(tasks.unseen)} tasks):    "
              f"{summary([row['familiarity'] for row in unseen_rows])}")

    # 3. adapter cosine from the factors vs full delta W
    query = generator.adapters([held[0][1]])  # any adapter: this part checks the arithmetic and times it
    others = inspector.task_adapters(0, len(index.task_ids))
    t0 = time.perf_counter()
    fast = adapter_cosine(query, others, index.modules)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    num = torch.zeros(len(index.task_ids))
    qn = torch.zeros(())
    on = torch.zeros(len(index.task_ids))
    for m in index.modules:
        dq = query.B[m][0].float() @ query.A[m][0].float()  # [L, out, in]
        do = others.B[m].float() @ others.A[m].float()  # [T, L, out, in]
        num += (do * dq).sum(dim=(1, 2, 3))
        qn += (dq * dq).sum()
        on += (do * do).sum(dim=(1, 2, 3))
    full = num / (qn.sqrt() * on.sqrt())
    t_full = time.perf_counter() - t0
    anchor = inspector.anchor()
    centred = adapter_cosine(query, others, index.modules, anchor)
    num = torch.zeros(len(index.task_ids))
    qn = torch.zeros(())
    on = torch.zeros(len(index.task_ids))
    for m in index.modules:
        da = anchor.B[m][0].float() @ anchor.A[m][0].float()
        dq = query.B[m][0].float() @ query.A[m][0].float() - da
        do = others.B[m].float() @ others.A[m].float() - da
        num += (do * dq).sum(dim=(1, 2, 3))
        qn += (dq * dq).sum()
        on += (do * do).sum(dim=(1, 2, 3))
    centred_full = num / (qn.sqrt() * on.sqrt())
    print(f"\nadapter cosine over {len(index.task_ids)} training adapters: factors {t_fast * 1000:.1f} ms, full delta W "
          f"{t_full * 1000:.1f} ms (baseline), {t_full / t_fast:.1f}x faster; max |difference| "
          f"{float((fast - full).abs().max()):.2e}; plain cosines {float(full.min()):.3f}..{float(full.max()):.3f}")
    print(f"  centred on the mean-task adapter: {float(centred_full.min()):+.3f}..{float(centred_full.max()):+.3f}, "
          f"max |factors - full| {float((centred - centred_full).abs().max()):.2e}")

    # 4. example figure
    if args.png:
        typical = min(range(len(held)), key=lambda i: abs(seen_pct[i] - 50.0))  # a median held-out description
        far = min(range(len(unseen_rows)), key=lambda i: unseen_rows[i]["familiarity"]) if unseen_rows else None
        example = [held[typical][1]] + ([unseen[far]] if far is not None else [])
        rows = inspect_run(run, example, k=5, png_file=args.png, json_file=args.json or None, device="cpu")
        for row in rows:
            print(f"\nexample: {row['description'][:100]}\n  familiarity {row['familiarity']:.0f} ({row['verdict']})"
                  f"\n  nearest tasks {[(t['task'], t['cosine']) for t in row['nearest_tasks'][:3]]}"
                  f"\n  closest adapters {[(t['task'], t['cosine']) for t in row['closest_adapters'][:3]]}"
                  f"\n  {row['norms_outside_training_range']} cells outside the training norm range")
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
