"""How much a run's generated adapters depend on the description, measured on the weights.

For each run folder: the spread (``runtime.inspection.adapter_spread``: the share of the
adapters' delta-W energy that is not their mean; 0 = one adapter for every text) of

- one held-out description of each training task ("training tasks"),
- one description of each unseen task ("unseen tasks"),
- random letters of those unseen descriptions' lengths ("random letters", control (f)):
  what the hypernetwork does with text that says nothing,
- the held-out descriptions of one training task, averaged over the tasks ("within a task"):
  how far rephrasing one task moves its adapter.

A hypernetwork that reads descriptions spreads the tasks well beyond rephrasings and random
letters; one that learned a multi-task LoRA in disguise spreads nothing. No base model is
loaded (encoder + hypernetwork only), so a run takes seconds.

    python benchmarks/adapter_spread.py docs/scaling_map/cells/*/t2l
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def spreads(run: Path, seed: int = 0) -> dict[str, float]:
    """The four spreads of one run folder (see the module docstring)."""
    import torch

    from t2l_framework.assembly.inspect import run_tasks
    from t2l_framework.assembly.loading import load_adapter_generator
    from t2l_framework.assembly.lookups import load_recipe
    from t2l_framework.data.description_controls import random_description
    from t2l_framework.runtime.inspection import adapter_spread

    generator = load_adapter_generator(run, torch.device("cpu"))
    cfg = load_recipe(run / "recipe.yaml", check_files=False)
    tasks = run_tasks(cfg, run / "recipe.yaml")
    modules = list(generator.hypernet.shapes.modules)

    def spread(descriptions: list[str]) -> float:
        with torch.inference_mode():
            return adapter_spread(generator.adapters(descriptions), modules)

    held_out = {t: heldout for t, (_, heldout) in tasks.train.items() if heldout}
    unseen = [d[0] for d in tasks.unseen.values()]
    out = {"training tasks": spread([h[0] for h in held_out.values()])}
    if len(unseen) >= 2:
        out["unseen tasks"] = spread(unseen)
        out["random letters"] = spread([random_description(d, seed) for d in unseen])
    within = [spread(h) for h in held_out.values() if len(h) >= 2]
    if within:
        out["within a task"] = sum(within) / len(within)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python benchmarks/adapter_spread.py runs/smollm2_demo")
    parser.add_argument("runs", nargs="+", type=Path, help="T2L run folders (recipe.yaml + hypernet/)")
    args = parser.parse_args()
    from t2l_framework.errors import T2LError

    columns = ["training tasks", "unseen tasks", "random letters", "within a task"]
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    failed = 0
    for run in args.runs:
        try:
            row = spreads(run)
        except T2LError as exc:  # one clear line per run it cannot measure; the others still are
            print(f"adapter_spread: {run}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"| {run} | " + " | ".join(f"{row[c]:.4f}" if c in row else "-" for c in columns) + " |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
