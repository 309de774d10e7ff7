"""Greedy decoding cost of per-sample LoRA: batch 8 with 8 distinct adapters against the base model.

Rows, all decoding the same prompts for exactly ``--new-tokens`` tokens with ``model.generate``
(the path ``T2LRuntime.chat`` and ``t2l serve`` use), methods interleaved per repetition, the
minimum over repetitions kept (on a shared machine other work only adds time):

  base     the base model without LoRA (the baseline every ratio is against)
  t2l      our batched LoRA, a distinct adapter per row (``injection.use(weights)``)
  peft     PEFT with one adapter for the whole batch (``--no-peft`` skips it)

Then the same base / t2l pair through ``greedy_decode`` (evaluation's decoder). Goal: t2l / base
<= 1.2 on CPU, <= 1.10 on GPU.

    python benchmarks/decode_overhead.py [--model PATH] [--dtype auto] [--batch 8] [--new-tokens 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from _common import PAPER_TARGETS, add_model_args, describe, load_model, random_adapters

CPU_GOAL, GPU_GOAL = 1.2, 1.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT row (saves a model copy)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rt = load_model(args, PAPER_TARGETS, device)
    model, injection, n = rt.model, rt.injection, args.batch
    weights = random_adapters(injection.shapes, n, device=device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, model.config.vocab_size - 1, (n, args.prompt_tokens), generator=g).to(device)
    mask = torch.ones_like(prompts)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=rt.pad_id, eos_token_id=None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def base():
        return model.generate(input_ids=prompts, attention_mask=mask, **kw)

    def t2l():
        with injection.use(weights):
            return model.generate(input_ids=prompts, attention_mask=mask, **kw)

    cases = {"base model, no LoRA": base, f"t2l, {n} distinct adapters": t2l}
    if not args.no_peft:
        import peft

        injection.remove()  # PEFT wraps the plain linear layers of a copy
        config = peft.LoraConfig(r=8, lora_alpha=16.0, target_modules=PAPER_TARGETS, lora_dropout=0.0,
                                 init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
        from t2l_framework.lora.batched import inject_lora

        injection = inject_lora(model, PAPER_TARGETS, rt.base.family)
        cases["peft, 1 adapter"] = lambda: pm.generate(input_ids=prompts, attention_mask=mask, **kw)

    from t2l_framework.runtime import greedy_decode

    ids = prompts.tolist()
    rows = [weights.select(i) for i in range(n)]
    cases["greedy_decode: base"] = lambda: greedy_decode(model, ids, None, None, args.new_tokens, (), rt.pad_id)
    cases[f"greedy_decode: t2l {n} adapters"] = lambda: greedy_decode(model, ids, rows, injection, args.new_tokens,
                                                                       (), rt.pad_id)
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for name, fn in cases.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"{describe(rt)}; {torch.get_num_threads()} threads; batch {n}, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, min of {args.reps}")
    base_ms = {"generate": best["base model, no LoRA"], "greedy_decode": best["greedy_decode: base"]}
    for name, sec in best.items():
        ref = base_ms["greedy_decode" if name.startswith("greedy_decode") else "generate"]
        print(f"  {name:<34} {sec / args.new_tokens * 1e3:8.2f} ms/token   {sec / ref:6.3f}x base")
    goal = GPU_GOAL if device.type == "cuda" else CPU_GOAL
    ratio = best[f"t2l, {n} distinct adapters"] / best["base model, no LoRA"]
    print(f"t2l / base = {ratio:.3f} (goal <= {goal} on {device.type}: {'met' if ratio <= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
