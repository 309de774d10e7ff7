"""Arrow routing's cost: ms per forward of Arrow over E library LoRAs against one LoRA, same run.

Both go through the project's injection on the same frozen base model (default the demo's
SmolLM2-135M): (a) one LoRA for the whole batch (``injection.use``, PEFT's plain 2-D path), the
baseline; (b) the base model alone; (c) Arrow over E experts per token (``injection.use_arrow``:
routing logits, top-k softmax, every expert's LoRA in two stacked matmuls). Forward only (Arrow is
an inference-time method) through the decoder body; the vocabulary projection costs the same for
every method and is left out. Methods are interleaved per repetition; the ratio uses the minimum
over repetitions (other processes on a shared CPU only add time); the median ratio is printed too.

    python benchmarks/arrow_overhead.py [--quick] [--experts 8,32] [--top-k -1] [--device cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import PAPER_TARGETS, add_model_args, describe, load_model, random_adapters
from t2l_framework.lora.arrow import ArrowLibrary


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repetitions, seq 64")
    parser.add_argument("--experts", default="8,32", help="comma-separated library sizes E (default 8,32)")
    parser.add_argument("--top-k", type=int, default=-1, help="Arrow experts per token (default -1: all, as mttl)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 256, --quick 64)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, --quick 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    add_model_args(parser, dtype_default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = args.reps or (2 if args.quick else 5)
    seq = args.seq or (64 if args.quick else 256)
    sizes = [int(e) for e in args.experts.split(",")]

    runtime = load_model(args, PAPER_TARGETS, device)
    injection, backbone = runtime.injection, runtime.model.base_model
    dtype = next(runtime.model.parameters()).dtype
    print(f"{describe(runtime)}; {torch.get_num_threads()} threads; batch {args.batch}, seq {seq}, r=8, "
          f"targets {PAPER_TARGETS}, top_k {args.top_k}")
    one = random_adapters(injection.shapes, 1, device=device, dtype=dtype)
    libraries = {e: ArrowLibrary.from_weights([f"task_{i}" for i in range(e)],
                                              random_adapters(injection.shapes, e, seed=e), args.top_k).to(device)
                 for e in sizes}
    ids = torch.randint(0, runtime.model.config.vocab_size, (args.batch, seq), device=device)

    def run_lora():
        with injection.use(one):
            backbone(input_ids=ids)

    def run_base():
        backbone(input_ids=ids)

    def make_arrow(lib):
        def run():
            with injection.use_arrow(lib):
                backbone(input_ids=ids)
        return run

    methods = {"(a) one LoRA": run_lora, "(b) base model": run_base}
    methods.update({f"(c) Arrow, E={e}": make_arrow(lib) for e, lib in libraries.items()})
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        for fn in methods.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in methods.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
    base_min, base_med = min(times["(a) one LoRA"]), statistics.median(times["(a) one LoRA"])
    print("\n| method | ms / forward (min) | median | vs one LoRA (min) | (median) |\n|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {min(ts):.1f} | {med:.1f} | {min(ts) / base_min:.2f}x | {med / base_med:.2f}x |")


if __name__ == "__main__":
    main()
