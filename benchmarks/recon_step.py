"""The recon loss's cost: ``delta_w_l1`` (chunked, recomputed in the backward) against the plain
``F.l1_loss(B @ A * s, B* @ A* * s)`` on the same factors, forward + backward, in one run.

Shapes default to the library demo's: SmolLM2-135M (30 layers, q_proj 576 -> 576, v_proj
576 -> 192), rank 8, 8 tasks a step. Prints each one's median time and plain / chunked.

    python benchmarks/recon_step.py
    python benchmarks/recon_step.py --layers 32 --dims 4096:4096,4096:1024 --batch 8   # Mistral-7B's q/v
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from t2l_framework.training.delta_w_l1 import delta_w_l1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="tasks per step")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dims", default="576:576,576:192", help="in:out of each target module, comma-separated")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    shapes = [tuple(int(x) for x in d.split(":")) for d in args.dims.split(",")]
    factors = []
    for fan_in, fan_out in shapes:
        lead = (args.batch, args.layers)
        factors.append([torch.randn(*lead, args.rank, fan_in, generator=gen) * 0.02,
                        torch.randn(*lead, fan_out, args.rank, generator=gen) * 0.02,
                        torch.randn(*lead, args.rank, fan_in, generator=gen) * 0.02,
                        torch.randn(*lead, fan_out, args.rank, generator=gen) * 0.02])

    def plain(A, B, tA, tB):
        return F.l1_loss(B @ A * 1e4, tB @ tA * 1e4)

    def step(loss_fn) -> float:
        leaves = [(A.clone().requires_grad_(), B.clone().requires_grad_(), tA, tB) for A, B, tA, tB in factors]
        start = time.perf_counter()
        torch.stack([loss_fn(A, B, tA, tB) for A, B, tA, tB in leaves]).mean().backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain F.l1_loss": [], "delta_w_l1": []}
    for i in range(args.repeats + 1):  # alternating, the first round untimed (warm-up)
        for name, fn in (("plain F.l1_loss", plain), ("delta_w_l1", lambda A, B, tA, tB: delta_w_l1(A, B, tA, tB, 1e4))):
            t = step(fn)
            if i:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"recon step loss, {args.batch} tasks x {args.layers} layers, modules {args.dims}, rank {args.rank}, "
          f"{torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:16s} {v * 1000:8.1f} ms (forward + backward, median of {args.repeats})")
    print(f"plain / delta_w_l1 = {med['plain F.l1_loss'] / med['delta_w_l1']:.2f}x")


if __name__ == "__main__":
    main()
