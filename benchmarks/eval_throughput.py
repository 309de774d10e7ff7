"""Log-likelihood scoring throughput: 8 distinct adapters in every batch vs one shared adapter.

`t2l eval` puts rows of different adapters (base, description, several T2L adapters, PEFT
baselines) into the same batches through the per-sample LoRA. This measures what that costs:
the same examples are scored (a) with one adapter shared by every row (the plain-matmul path,
what a PEFT model with one active adapter does) and (b) with 8 different adapters spread over
each batch (the per-row ``bmm`` path), plus (c) the base model with no LoRA for reference.

    python benchmarks/eval_throughput.py                 # SmolLM2-135M (offline), ARC-Easy prompts
    python benchmarks/eval_throughput.py --examples 128 --batch-size 32 --reps 3
    python benchmarks/eval_throughput.py --model PATH --dtype bfloat16   # another base (a local folder)

Prints examples/s for each and the ratio time(8 adapters) / time(1 adapter) (target <= 1.2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import add_model_args, base_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="smollm2_demo", help="recipe whose LoRA targets and chat settings to use "
                        "(the base model is --model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--benchmark", default="arc_easy")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (the median is reported)")
    add_model_args(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from t2l_framework.assembly import get_benchmarks, load_recipe, runtime_for
    from t2l_framework.config import find_recipe
    from t2l_framework.eval.loglik import OptionsRow, encode_continuations, option_logprobs
    from t2l_framework.lora.weights import LoraWeights

    cfg = load_recipe(find_recipe(args.recipe))
    runtime = runtime_for(base_config(args, cfg.base_model), args.device, args.dtype, target_modules=list(cfg.lora.target_modules))
    shapes, rank = runtime.injection.shapes, cfg.lora.rank
    gen = torch.Generator().manual_seed(0)

    def adapter() -> LoraWeights:
        A = {m: torch.randn(1, shapes.n_layers, rank, i, generator=gen) * 0.02 for m, (i, o) in shapes.shapes.items()}
        B = {m: torch.randn(1, shapes.n_layers, o, rank, generator=gen) * 0.02 for m, (i, o) in shapes.shapes.items()}
        return LoraWeights(A, B, rank, float(cfg.lora.alpha))

    adapters = [adapter() for _ in range(8)]
    (bench,) = get_benchmarks([args.benchmark])
    encoded = [encode_continuations(runtime.tokenizer, runtime.format(ex.prompt), ex.labels)
               for ex in bench.examples(args.examples)]

    def rows(pick) -> list[OptionsRow]:
        return [OptionsRow(ctx, opts, pick(i)) for i, (ctx, opts) in enumerate(encoded)]

    cases = {"base model, no LoRA": rows(lambda i: None),
             "1 adapter shared by all rows": rows(lambda i: adapters[0]),
             "8 distinct adapters in every batch": rows(lambda i: adapters[i % 8])}
    # the examples are sorted by length inside option_logprobs; i % 8 still mixes 8 adapters per batch
    option_logprobs(runtime.model, runtime.injection, cases["1 adapter shared by all rows"][:args.batch_size],
                    args.batch_size, runtime.pad_id)  # warm-up
    seconds = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, case in cases.items():  # interleaved, so drifts in machine load hit every case alike
            t0 = time.perf_counter()
            option_logprobs(runtime.model, runtime.injection, case, args.batch_size, runtime.pad_id)
            seconds[name].append(time.perf_counter() - t0)
    tokens = sum(len(ctx) for ctx, _ in encoded)
    print(f"{runtime.base_model_name} ({runtime.dtype}), {args.benchmark}: {len(encoded)} examples, "
          f"{tokens / len(encoded):.0f} tokens each, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    for name, values in seconds.items():
        med = statistics.median(values)
        print(f"  {name:<36} {len(encoded) / med:7.1f} examples/s  ({med:.2f} s)")
    one = statistics.median(seconds["1 adapter shared by all rows"])
    eight = statistics.median(seconds["8 distinct adapters in every batch"])
    print(f"ratio time(8 adapters) / time(1 adapter) = {eight / one:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
