"""Which dtype ``auto`` picks here, and what one CPU-demo training step costs in each dtype.

A demo step is one forward + backward of SmolLM2-135M-Instruct with a distinct rank-8 LoRA
per sample on q_proj and v_proj (the gradient flows into the LoRA factors, the base model is
frozen), on a real batch of the demo's stream: 8 tasks x 1 sample, tokenised and padded as
``recipes/smollm2_demo.yaml`` does it. The loss is the demo's (``T2LModule.lm_loss``: logits
only on answer tokens, label smoothing, NEFTune). The hypernetwork and the optimizer are left
out: they cost the same in both dtypes and are small next to the LLM.

On a CPU without native bf16 (AVX2 only) a bf16 step is emulated and very slow, so each dtype
gets a time budget (``--budget-s``): it stops repeating once that is spent, after at least one
timed step. Times are wall clock, with the process's CPU time beside them; on a shared machine
other jobs only add time, so the minimum is the best estimate of the cost and the spread
(min..max) shows the noise. On an oversubscribed machine OpenMP threads spin waiting for each
other and 2-thread wall times can be 10x too long; there ``--threads 1`` gives a CPU time that
other jobs barely change (the single-core cost of a step).

    python benchmarks/dtype_check.py [--reps 3] [--budget-s 60] [--dtypes float32,bfloat16] [--threads 1] [--model PATH]

``--dtype X`` (not auto) times X alone, like ``--dtypes X``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import add_model_args, check_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "smollm2_demo.yaml"


def demo_batches(cfg, tokenizer, family, n: int) -> list[dict]:
    """The first ``n`` training batches of the demo's stream (seed from the recipe)."""
    from functools import partial

    from t2l_framework.data.datamodule import T2LDataModule

    fmt = partial(family.format_prompt, tokenizer, chat_template=bool(cfg.base_model.chat_template))
    dm = T2LDataModule(cfg.data, tokenizer, lambda user, system="": fmt(user, system), int(cfg.training.seed),
                       DEMO, total_batches=n)
    dataset = dm.train_dataset()
    return [dataset[i] for i in range(n)]


def per_sample_lora(shapes, batch: int, rank: int, alpha: float, use_rslora: bool):
    """A distinct random adapter per sample, as leaf tensors that collect gradients.

    A[m]: [batch, n_layers, rank, in]; B[m]: [batch, n_layers, out, rank] (B non-zero, so the
    LoRA path is not trivially skipped by autograd).
    """
    from t2l_framework.lora.weights import LoraWeights

    gen = torch.Generator().manual_seed(0)
    A, B = {}, {}
    for m, (fan_in, fan_out) in shapes.shapes.items():
        A[m] = (torch.randn(batch, shapes.n_layers, rank, fan_in, generator=gen) / fan_in ** 0.5).requires_grad_()
        B[m] = (torch.randn(batch, shapes.n_layers, fan_out, rank, generator=gen) * 1e-3).requires_grad_()
    return LoraWeights(A, B, rank, alpha, use_rslora)


def time_step(module, batch: dict, weights) -> tuple[float, float]:
    """(wall, CPU) seconds for one forward + backward of the demo loss."""
    for t in list(weights.A.values()) + list(weights.B.values()):
        t.grad = None
    start, cpu = time.perf_counter(), time.process_time()
    loss, _ = module.lm_loss(batch, weights, module.settings.label_smoothing)
    loss.backward()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per dtype after one warm-up (default 3)")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="stop repeating a dtype once this many seconds are spent on it (default 60)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    add_model_args(parser)
    args = parser.parse_args()
    check_model(args)
    if args.dtype != "auto":
        args.dtypes = args.dtype
    if args.threads:
        torch.set_num_threads(args.threads)

    from t2l_framework.config import load_recipe
    from t2l_framework.llm.dtype import DTYPES, pick_dtype
    from t2l_framework.llm.loading import load_base_model
    from t2l_framework.lora.batched import inject_lora
    from t2l_framework.training.module import LearnedLora, T2LModule

    choice = pick_dtype("auto", "cpu")
    print(f"auto picks {choice.name} on this CPU: {choice.reason}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    cfg = load_recipe(str(DEMO), ["base_model.dtype=float32", f"base_model.name_or_path={args.model}"])
    start = time.perf_counter()
    base = load_base_model(cfg.base_model, device="cpu")
    injection = inject_lora(base.model, list(cfg.lora.target_modules))
    print(f"{args.model} loaded in {time.perf_counter() - start:.1f} s")
    n_batches = args.reps + 1
    batches = demo_batches(cfg, base.tokenizer, base.family, n_batches)
    lengths = [tuple(b["input_ids"].shape) for b in batches]
    print(f"demo batches (rows x padded tokens): {', '.join(f'{r}x{t}' for r, t in lengths)}")
    lora = cfg.lora
    module = T2LModule(cfg, LearnedLora(injection.shapes, int(lora.rank), float(lora.alpha)), base.model, injection)
    module.train()  # NEFTune on, as in training

    times: dict[str, list[tuple[float, float]]] = {}
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if name not in DTYPES:
            print(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}", file=sys.stderr)
            return 2
        base.model.to(DTYPES[name])
        weights = per_sample_lora(injection.shapes, batches[0]["input_ids"].shape[0], int(lora.rank),
                                  float(lora.alpha), bool(lora.use_rslora))
        first = time_step(module, batches[0], weights)  # warm-up: allocator, kernels, caches
        spent, times[name] = first[0], []
        print(f"  {name:<9} warm-up {first[0]:7.2f} s (cpu {first[1]:.2f} s)", flush=True)
        for i in range(1, n_batches):
            if spent >= args.budget_s:
                break
            wall, cpu = time_step(module, batches[i], weights)
            spent += wall
            times[name].append((wall, cpu))
            print(f"  {name:<9} step {i} ({lengths[i][0]}x{lengths[i][1]} tokens) {wall:7.2f} s (cpu {cpu:.2f} s)",
                  flush=True)
        if not times[name]:  # the warm-up alone spent the budget: report it rather than nothing
            times[name].append(first)

    print("\nfwd+bwd of one demo step, wall seconds: min / median / max over the timed steps (CPU seconds):")
    for name, ts in times.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        print(f"  {name:<9} {min(walls):7.2f} / {statistics.median(walls):7.2f} / {max(walls):7.2f}   "
              f"(cpu {min(cpus):.2f} / {statistics.median(cpus):.2f} / {max(cpus):.2f})   {len(ts)} steps")
    if "float32" in times and "bfloat16" in times:
        ratio = min(w for w, _ in times["bfloat16"]) / min(w for w, _ in times["float32"])
        print(f"bfloat16 / float32 = {ratio:.1f}x (minimum wall time over steps); auto picks {choice.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
