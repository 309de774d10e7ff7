"""Training throughput: the paper's batch (8 tasks x 1 sample) against throughput mode
(``data.tokens_per_step``: several samples per task, length-grouped, a padded-token budget).

Both modes train on the same recipe data (the demo's SNI tasks by default) with the same base
model; their steps are timed alternately in one process, so a busy machine slows both alike.
Each step is the multi-task LoRA's forward + backward (``training.mode=lora``: the same
batched-LoRA path as T2L without the description encoder, whose cost per step is small: T2L/LoRA
= 1.05 on an H200, docs/performance.md). Prints tokens/s of each and the ratio.

    python benchmarks/train_throughput.py                       # the demo's SmolLM2 (offline)
    python benchmarks/train_throughput.py --model /path/folder --dtype bfloat16 --steps 10
    python benchmarks/train_throughput.py --make-standin /tmp/standin   # random-weight stand-in
    python benchmarks/train_throughput.py --compile inductor --warmup 2   # + training.compile

``--make-standin OUT`` writes a random-weight copy of ``--model``'s architecture (its config and
tokenizer, fresh weights; the GPU kit's approach, /work/shared/gpu-kit) and exits; pass that
folder as ``--model``. ``--layers`` / ``--hidden`` shrink or grow it (``--hidden 4096 --layers 32
--intermediate 14336 --heads 32 --kv-heads 8`` are Mistral-7B's dims).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _common import add_model_args, check_model


def make_standin(model: str, out: Path, args) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from t2l_framework.config import BaseModelConfig
    from t2l_framework.llm.loading import load_base_model

    base = load_base_model(BaseModelConfig(name_or_path=model, dtype="float32"))
    config = AutoConfig.for_model(**base.model.config.to_dict())
    for key, value in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                       ("intermediate_size", args.intermediate), ("num_attention_heads", args.heads),
                       ("num_key_value_heads", args.kv_heads)):
        if value:
            setattr(config, key, value)
    if args.hidden and not args.heads:
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    print(f"random-weight stand-in of {model} ({config.num_hidden_layers} layers, hidden {config.hidden_size}) in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--recipe", default="smollm2_demo", help="recipe whose data and LoRA settings are used")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--tokens-per-step", type=int, default=2048, help="throughput mode: padded tokens per step")
    ap.add_argument("--samples-per-task", type=int, default=4, help="throughput mode: samples per task per draw")
    ap.add_argument("--compile", metavar="BACKEND", help="also time throughput mode with training.compile=true "
                    "and this torch.compile backend (e.g. inductor), against the same mode uncompiled")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (compilation happens here; "
                    "use 2 or more with --compile: the second shape recompiles with dynamic shapes)")
    ap.add_argument("--make-standin", type=Path, help="write a random-weight stand-in of --model here and exit")
    for key in ("layers", "hidden", "intermediate", "heads", "kv-heads"):
        ap.add_argument(f"--{key}", type=int, default=0, help="stand-in size (0 = as --model)")
    args = ap.parse_args()
    check_model(args)
    if args.make_standin:
        return make_standin(args.model, args.make_standin, args)

    from t2l_framework.assembly import loading
    from t2l_framework.assembly.fit import planned_device
    from t2l_framework.assembly.lookups import load_recipe
    from t2l_framework.config import find_recipe
    from t2l_framework.data.datamodule import T2LDataModule
    from t2l_framework.training.module import LearnedLora, T2LModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = [f"base_model.name_or_path={args.model}", f"base_model.dtype={args.dtype}", "training.mode=lora",
              f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]
    modes = {
        "paper batch (8 x 1)": common + ["data.length_grouping=false", "data.tokens_per_step=0",
                                         "data.n_samples_per_task=1"],
        f"budget {args.tokens_per_step} tok (8 x {args.samples_per_task}, grouped)": common + [
            f"data.tokens_per_step={args.tokens_per_step}", f"data.n_samples_per_task={args.samples_per_task}"],
    }
    cfgs = {name: load_recipe(args.recipe, overrides) for name, overrides in modes.items()}
    cfg = next(iter(cfgs.values()))
    base, injection = loading.load_base(cfg.base_model, list(cfg.lora.target_modules),
                                        runs_on=planned_device(cfg.trainer.accelerator))
    model = base.model.to(device)
    fmt = base.family.format_prompt
    module = T2LModule(cfg, LearnedLora(injection.shapes, int(cfg.lora.rank), float(cfg.lora.alpha)), model,
                       injection).to(device)
    module.train()
    streams, modules = {}, {}
    for name, c in cfgs.items():
        dm = T2LDataModule(c.data, base.tokenizer, lambda u, s="": fmt(base.tokenizer, u, s), int(c.training.seed),
                           find_recipe(args.recipe), 10**6)
        streams[name], modules[name] = dm.train_dataset(), module
    budget_name = list(modes)[1]
    if args.compile:  # the same budget stream through a module whose decoder stack is compiled
        compiled_name = f"{budget_name} + compile ({args.compile})"
        ccfg = load_recipe(args.recipe, modes[budget_name] + ["training.compile=true",
                                                              f"training.compile_backend={args.compile}"])
        streams[compiled_name] = streams[budget_name]
        modules[compiled_name] = T2LModule(ccfg, module.generator, model, injection).to(device).train()

    def step(batch, module) -> tuple[float, int, int]:
        batch = {k: v.to(device) for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = module._step(batch, train=True)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        module.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    times = {name: [] for name in streams}
    for k in range(args.steps + args.warmup):  # alternate the modes; the first steps are a warm-up
        for name, data in streams.items():
            result = step(data[k], modules[name])
            if k >= args.warmup:
                times[name].append(result)
    dt = base.dtype.dtype if base.dtype else model.dtype
    print(f"{args.model} ({dt}) on {device}, recipe {args.recipe}, {args.steps} steps per mode, "
          f"{time.strftime('%Y-%m-%d')}")
    rate = {}
    for name, rows in times.items():
        seconds = sum(r[0] for r in rows)
        tokens, padded = sum(r[1] for r in rows), sum(r[2] for r in rows)
        rate[name] = tokens / seconds
        print(f"  {name:<40} {statistics.median(r[0] for r in rows):7.3f} s/step  {tokens / len(rows):8.0f} tokens/step"
              f"  padding {1 - tokens / padded:5.1%}  {rate[name]:9.1f} tokens/s")
    paper, budget = rate[list(modes)[0]], rate[budget_name]
    print(f"  throughput mode / paper batch: {budget / paper:.2f}x tokens/s")
    if args.compile:
        print(f"  compiled / uncompiled throughput mode: {rate[compiled_name] / budget:.2f}x tokens/s")


if __name__ == "__main__":
    main()
