"""Cost of a library run (one LoRA per training task, ``training.mode=library``) against the
multi-task LoRA (``training.mode=lora``) on the same batches: library time / multi-task time.

Both train steps (forward + backward + optimizer step) run in one process on the same base model
and the same batches of the recipe's stream, alternating step by step, so a busy machine slows
both alike. The library step gathers each sample's task LoRA from the bank and applies it per
sample (batched matmuls); the multi-task step applies one LoRA to the whole batch (plain matmuls),
and its AdamW updates one LoRA where the library's TaskRowAdamW updates the rows of the batch's tasks.

    python benchmarks/library_cost.py                     # the demo's SmolLM2, smollm2_library recipe
    python benchmarks/library_cost.py --steps 8 --model /path/folder --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import add_model_args, check_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, dtype_default="float32")
    ap.add_argument("--recipe", default="smollm2_library", help="a library recipe: its data and LoRA settings")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    check_model(args)

    from t2l_framework.assembly import loading
    from t2l_framework.assembly.fit import planned_device
    from t2l_framework.assembly.lookups import load_recipe
    from t2l_framework.config import find_recipe
    from t2l_framework.data.datamodule import T2LDataModule
    from t2l_framework.training.library import TaskLoraBank
    from t2l_framework.training.module import LearnedLora, T2LModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = [f"base_model.name_or_path={args.model}", f"base_model.dtype={args.dtype}",
              f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]
    cfgs = {m: load_recipe(args.recipe, common + [f"training.mode={m}"]) for m in ("library", "lora")}
    cfg = cfgs["library"]
    base, injection = loading.load_base(cfg.base_model, list(cfg.lora.target_modules),
                                        runs_on=planned_device(cfg.trainer.accelerator))
    model = base.model.to(device)
    fmt = base.family.format_prompt
    dm = T2LDataModule(cfg.data, base.tokenizer, lambda u, s="": fmt(base.tokenizer, u, s), int(cfg.training.seed),
                       find_recipe(args.recipe), 10**6)
    dm.setup()
    data = dm.train_dataset()
    lora = dict(rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha), use_rslora=bool(cfg.lora.use_rslora))
    generators = {"library": TaskLoraBank(injection.shapes, dm.train_task_ids, **lora),
                  "lora": LearnedLora(injection.shapes, **lora)}
    modules, optimizers = {}, {}
    for name, gen in generators.items():
        modules[name] = T2LModule(cfgs[name], gen, model, injection).to(device).train()
        optimizers[name] = modules[name].configure_optimizers()["optimizer"]

    def step(name: str, batch: dict) -> float:
        batch = {k: v.to(device) for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = modules[name]._step(batch, train=True)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in modules}
    for k in range(args.warmup + args.steps):
        batch = data[k]  # the same batch for both
        for name in modules:
            dt = step(name, batch)
            if k >= args.warmup:
                times[name].append(dt)
    n_params = {name: sum(p.numel() for p in g.parameters()) for name, g in generators.items()}
    print(f"{args.model} ({model.dtype}) on {device}, recipe {args.recipe}: {len(dm.train_task_ids)} tasks, "
          f"{args.steps} timed steps per mode, {time.strftime('%Y-%m-%d')}")
    for name, label in (("lora", "multi-task LoRA (1 LoRA)"), ("library", f"library ({len(dm.train_task_ids)} LoRAs)")):
        print(f"  {label:<28} median {statistics.median(times[name]):7.3f} s/step  total {sum(times[name]):8.2f} s  "
              f"{n_params[name] / 1e6:7.2f}M trainable")
    print(f"  library time / multi-task LoRA time, same {args.steps} steps: {sum(times['library']) / sum(times['lora']):.2f}x")


if __name__ == "__main__":
    main()
