"""LoRA overhead on a base model (default the demo's SmolLM2-135M): our batched per-sample LoRA against PEFT and the naive way.

Measured in one process, methods interleaved per repetition; ratios use the minimum over
repetitions (other processes on a shared CPU only add time), medians are printed too:
  (a) PEFT, one LoRA for the whole batch
  (b) ours, a distinct adapter per sample (batched matmuls)
  (c) naive per-sample LoRA: each sample's A/B repeated per token ([batch*seq, r, in]) + einsum
  (d) PEFT mixed-adapter batch: 8 adapters loaded, one per sample via ``adapter_names=``
Training step = forward + backward w.r.t. the LoRA factors (base frozen) through the decoder
body (the vocabulary projection is left out: it costs the same for every method and would
hide the LoRA overhead). PEFT allows ``adapter_names`` only in inference, so (d) is
forward-only; forward-only figures are given for all four. Then greedy decoding of 64 new
tokens, batch 8: ours with 8 adapters vs PEFT with one adapter and PEFT mixed batches.

    python benchmarks/lora_overhead.py [--quick] [--device cuda] [--threads 2] [--model PATH] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import add_model_args, base_config
from t2l_framework.llm import load_base_model
from t2l_framework.lora import LoraWeights, inject_lora

TARGETS = ["q_proj", "v_proj"]  # the paper's targets
RANK, ALPHA = 8, 16.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The per-token approach: every token carries its sample's copy of A and B."""
    y = self.base_layer(x)
    n, seq = x.shape[0], x.shape[1]
    A = self.lora_A.to(x.dtype).repeat_interleave(seq, 0)  # [n*seq, r, in]
    B = self.lora_B.to(x.dtype).repeat_interleave(seq, 0)  # [n*seq, out, r]
    h = torch.einsum("ti,tri->tr", x.reshape(n * seq, -1), A)
    return y + self.scaling * torch.einsum("tr,tor->to", h, B).view(y.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, seq 64, 16 new tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, --quick 2)")
    add_model_args(parser, dtype_default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    reps, seq, new_tokens = (2, 64, 16) if args.quick else (5, 256, 64)
    reps = args.reps or reps
    n = args.batch

    import copy

    import peft

    start = time.perf_counter()
    base = load_base_model(base_config(args), device=device).model
    print(f"{args.model} ({next(base.parameters()).dtype}) loaded in {time.perf_counter() - start:.1f} s on {device} "
          f"({torch.get_num_threads()} threads); batch {n}, seq {seq}, r={RANK}, targets {TARGETS}")

    # PEFT model with n adapters (a0 is the single-adapter baseline).
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", config)
    pm.set_adapter("a0")
    pm.eval()
    peft_params = [p for name, p in pm.named_parameters() if ".a0." in name]
    for p in peft_params:
        p.requires_grad_(True)
    names = [f"a{i}" for i in range(n)]

    injection = inject_lora(base, TARGETS)
    g = torch.Generator().manual_seed(0)
    s = injection.shapes
    weights = LoraWeights({m: (torch.randn(n, s.n_layers, RANK, i, generator=g) * 0.02).to(device) for m, (i, o) in s.shapes.items()},
                          {m: (torch.randn(n, s.n_layers, o, RANK, generator=g) * 0.02).to(device) for m, (i, o) in s.shapes.items()},
                          RANK, ALPHA)
    leaves = [*weights.A.values(), *weights.B.values()]
    for t in leaves:
        t.requires_grad_(True)
    wrapped = [mod for mods in injection.layers.values() for mod in mods]

    x = torch.randint(0, base.config.vocab_size, (n, seq), generator=g).to(device)
    peft_body = pm.base_model.model.model

    def peft_one(train: bool):
        out = peft_body(input_ids=x).last_hidden_state
        if train:
            out.float().pow(2).mean().backward()

    def peft_mixed(train: bool):
        peft_body(input_ids=x, adapter_names=names)  # PEFT: inference only

    def ours(train: bool, naive: bool = False):
        if naive:
            for mod in wrapped:
                mod.forward = naive_forward.__get__(mod)
        try:
            with injection.use(weights):
                out = base.model(input_ids=x).last_hidden_state
                if train:
                    out.float().pow(2).mean().backward()
        finally:
            for mod in wrapped:
                mod.__dict__.pop("forward", None)

    methods = {"a PEFT 1 adapter": lambda t: peft_one(t), "b ours 8 adapters": lambda t: ours(t),
               "c naive per-token": lambda t: ours(t, naive=True), "d PEFT mixed 8": peft_mixed}

    def timed(fn, train: bool) -> float:
        for p in peft_params + leaves:
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        if train:
            fn(True)
        else:
            with torch.no_grad():
                fn(False)
        sync(device)
        return time.perf_counter() - t0

    results: dict[tuple[str, bool], list[float]] = {}
    for train in (True, False):
        todo = [k for k in methods if train is False or not k.startswith("d")]
        for k in todo:
            timed(methods[k], train)  # warm-up
        for _ in range(reps):
            for k in todo:
                results.setdefault((k, train), []).append(timed(methods[k], train))
    # On a shared CPU other processes only ever add time, so ratios use the minimum; the
    # median is printed alongside.
    med = {key: min(v) for key, v in results.items()}
    mid = {key: statistics.median(v) for key, v in results.items()}

    def ratio(a: str, b: str, train: bool) -> float:
        return med[(a, train)] / med[(b, train)]

    A, B, C, D = methods
    print(f"\nforward+backward (LoRA factors only), min / median of {reps}:")
    for k in (A, B, C):
        print(f"  {k:22s} {med[(k, True)] * 1000:9.1f} ms / {mid[(k, True)] * 1000:9.1f} ms")
    print(f"  b/a = {ratio(B, A, True):.3f}  (target <= 1.10)")
    print(f"  c/b = {ratio(C, B, True):.3f}  (target >= 1.5)")
    print(f"  (d) PEFT mixed batches: forward-only, PEFT refuses adapter_names in training")
    print(f"\nforward only, min / median of {reps}:")
    for k in methods:
        print(f"  {k:22s} {med[(k, False)] * 1000:9.1f} ms / {mid[(k, False)] * 1000:9.1f} ms")
    print(f"  b/a = {ratio(B, A, False):.3f}  c/b = {ratio(C, B, False):.3f}  "
          f"b/d = {ratio(B, D, False):.3f}  (target b/d <= 1.0)")

    # Greedy decoding with KV cache.
    prompt = x[:, :32]
    mask = torch.ones_like(prompt)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    gen = {
        "PEFT 1 adapter": lambda: pm.generate(input_ids=prompt, attention_mask=mask, **kw),
        "PEFT mixed 8": lambda: pm.generate(input_ids=prompt, attention_mask=mask, adapter_names=names, **kw),
        "base model": lambda: base.generate(input_ids=prompt, attention_mask=mask, **kw),  # no adapter set
    }

    def ours_gen():
        with injection.use(weights):
            return base.generate(input_ids=prompt, attention_mask=mask, **kw)

    gen = {"ours 8 adapters": ours_gen, **gen}
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(max(1, reps - 1)):
            for k, fn in gen.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.setdefault(k, []).append(time.perf_counter() - t0)
    gmed = {k: min(v) for k, v in times.items()}
    print(f"\ngreedy decoding, batch {n}, prompt 32, {new_tokens} new tokens, min of {len(times['base model'])}:")
    for k, v in gmed.items():
        print(f"  {k:22s} {v * 1000:9.1f} ms  ({v / new_tokens * 1000:.1f} ms/token)")
    print(f"  ours / PEFT 1 adapter = {gmed['ours 8 adapters'] / gmed['PEFT 1 adapter']:.3f}  (target <= 1.2)")
    print(f"  ours / PEFT mixed 8   = {gmed['ours 8 adapters'] / gmed['PEFT mixed 8']:.3f}")


if __name__ == "__main__":
    main()
