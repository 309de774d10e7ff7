"""Tasks x steps scaling map: T2L against the multi-task LoRA at equal work, and the description controls.

For every cell (N training tasks, S steps) of the grid it trains the multi-task LoRA
(``recipes/smollm2_demo_mtlora.yaml``) and T2L (``recipes/smollm2_demo.yaml``) on the same N tasks
(the rule of ``data/demo_tasks.yaml``: ``data.demo_task_sets``) for S steps each, with the same
unseen set, and reads T2L's end-of-training table: (c) and the paired differences
(c)-(d) another task's description, (c)-(e) the multi-task LoRA, (c)-(f) random letters and
(c)-(g) the generic description, in task-clustered SE (cSE), on the unseen and the training tasks.

Each cell is its own pair of ``t2l fit`` processes writing ``OUT/cells/N_tasks-S_steps-seedK[-OVERRIDES]/``
(``--set`` overrides give the folder a short hash of them, so a lever never reuses a plain cell); a cell
with a ``cell.json`` is finished and skipped, so an interrupted map resumes where it stopped.
After every cell the table (``OUT/scaling_map.md`` + ``.json``, wall time and CPU kind per cell)
and the plot (``OUT/scaling_map.png``) are rewritten from every finished cell under ``OUT/cells``,
also those of earlier calls with other grids.

    python benchmarks/scaling_map.py --tasks 10,30,all --steps 96,288,864 --out docs/scaling_map
    python benchmarks/scaling_map.py --tasks 10 --steps 8 --eval-instances 2 --out /tmp/map   # one tiny cell

A lever only T2L reads (``--set-t2l``: the hypernetwork, the encoder, the head-bias learning rate) is its
own cell that shares the multi-task LoRA of the cell without it (trained there once, linked), so (e) is the
same run for every such lever:

    python benchmarks/scaling_map.py --tasks all --steps 864 --set training.warmup_ratio=0.1 \
        --set-t2l training.lr_head_bias=0.2 --out docs/scaling_map

A cell trained elsewhere joins the map with ``--record``, once both runs' recipes are checked to be that cell:

    make demo-long DEMO_ARGS="training.seed=7"
    python benchmarks/scaling_map.py --tasks all --steps 864 --seed 7 --set training.warmup_ratio=0.1 \
        --record runs/smollm2_demo_long --out docs/scaling_map
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNSEEN, SEEN = "Tasks never seen in training", "Training tasks, held-out instances and descriptions"
# (label in the table, condition name in report.json)
CONTRASTS = [("(c)-(d)", "t2l_other_task_description"), ("(c)-(e)", "mt_lora"),
             ("(c)-(f)", "t2l_random_description"), ("(c)-(g)", "t2l_generic_description")]
PLOTTED = ["(c)-(d)", "(c)-(f)", "(c)-(e)"]
# Overrides the multi-task LoRA run never reads (it has no hypernetwork and no encoder): ``--set-t2l`` takes
# only these, so a cell with them can share the multi-task LoRA of the cell without them.
T2L_ONLY = ("hypernet.", "encoder.", "training.lr_head_bias=")


def cpu_kind() -> str:
    """The CPU model, its core count and whether it has native bf16 (what `dtype: auto` decides by)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    flags = next((line for line in info if line.startswith("flags")), "")
    bf16 = "AVX512_BF16" if "avx512_bf16" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return f"{model}, {os.cpu_count()} cores, {bf16}"


def fit(recipe: str, overrides: list[str], log: Path) -> int:
    """One ``t2l fit`` in its own process (this worktree's code first on the path); its output goes to ``log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with open(log, "w") as f:
        return subprocess.call([sys.executable, "-m", "t2l_framework.cli", "fit", recipe, *overrides, "--overwrite"],
                               stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def cell_numbers(report_json: Path) -> dict:
    """(c) and each contrast in cSE per split, from a T2L run's report.json."""
    from t2l_framework.eval.sni_report import LIKELIHOOD, paired_differences, rescore

    tables, training = rescore(report_json)
    out = {"training": training}
    for split, title in (("unseen", UNSEEN), ("seen", SEEN)):
        if title not in tables:
            continue
        res, diffs = tables[title], paired_differences(tables[title])
        row = {"c_em": res["t2l"]["em"], "c_em_se": res["t2l"]["em_se"], "items": res["t2l"]["n"]}
        for label, name in CONTRASTS:
            if name in diffs:
                d = diffs[name]
                row[label] = {"em": d["em"], "em_se": d["em_se"], "cse": _ratio(d["em"], d["em_se"])}
                if LIKELIHOOD in d:
                    row[label].update(ll=d[LIKELIHOOD], ll_se=d[f"{LIKELIHOOD}_se"],
                                      ll_cse=_ratio(d[LIKELIHOOD], d[f"{LIKELIHOOD}_se"]))
        out[split] = row
    return out


def _ratio(diff: float, se: float) -> float | None:
    return diff / se if se and se == se else None


# `t2l eval` adapter -> the end-of-training table's condition (report.json), for a cell's T2L run
def _table_adapters(cell: Path) -> dict[str, str]:
    mt_lora = cell / "mt_lora" / "adapter"
    return {"base": "base", "base+description": "base+description", "t2l": "t2l",
            "other_description": "t2l_other_task_description",
            **({f"mt_lora={mt_lora}": "mt_lora"} if mt_lora.is_dir() else {}),
            "random_description": "t2l_random_description", "generic_description": "t2l_generic_description"}


def backfill_likelihood(cell: Path) -> bool:
    """A cell trained before the tables scored the answer likelihood gets it now: the reference answers
    of its report's items scored under each condition from the runs on disk, without generating
    (``assembly.evaluate.answer_likelihoods``), written into its report.json as the tables write it.
    False when the report's items are not the runs' splits (nothing is written then)."""
    from t2l_framework.assembly.evaluate import RUN_SPLITS, answer_likelihoods
    from t2l_framework.eval.sni_report import LIKELIHOOD

    report_json = cell / "t2l" / "report.json"
    report = json.loads(report_json.read_text())
    adapters = {spec: name for spec, name in _table_adapters(cell).items()
                if all(name in t for t in report["tables"].values())}
    # dtype None: the recipe's, as the end-of-training table ran
    fast = answer_likelihoods(cell / "t2l", list(RUN_SPLITS), list(adapters), dtype=None, show_progress=False)
    for bench, (_, title) in RUN_SPLITS.items():
        items = report["tables"].get(title, {}).get("items")
        if items is None:
            continue
        if fast[bench]["tasks"] != [it["task"] for it in items]:
            print(f"[map] {cell.name}: its report's {bench} items are not its run's; likelihood not back-filled")
            return False
        for spec, name in adapters.items():
            for it, value in zip(items, fast[bench][spec.split("=", 1)[0]]):
                it[f"{name}:{LIKELIHOOD}"] = value
    report_json.write_text(json.dumps(report, indent=1))
    return True


def cell_name(n_tasks: int | str, steps: int, seed: int, sets: list[str], t2l_sets: list[str] = ()) -> str:
    """A cell's folder: its grid point, its seed and (when given) a hash of its extra overrides, those of
    both runs and those of T2L alone (``T2L `` before each), so no two levers share a folder."""
    name = f"{n_tasks}_tasks-{steps}_steps-seed{seed}"
    keys = list(sets) + [f"T2L {s}" for s in t2l_sets]
    return name + (f"-{hashlib.sha1(chr(10).join(keys).encode()).hexdigest()[:8]}" if keys else "")


def check_t2l_only(t2l_sets: list[str]) -> None:
    """``--set-t2l`` takes only overrides the multi-task LoRA never reads; anything else would make the
    shared (e) a run of other settings, so it is refused with the key named."""
    for s in t2l_sets:
        if "=" not in s or not s.startswith(T2L_ONLY):
            raise SystemExit(f"[map] --set-t2l {s!r}: only hypernet.*, encoder.* and training.lr_head_bias=VALUE are "
                             "T2L's alone (the multi-task LoRA would not read it); use --set for both runs")


def finished_cells(out: Path) -> list[dict]:
    """Every finished cell under ``out/cells`` (each one's ``cell.json``), in a stable order. A cell
    recorded before the adapter spread was measured gets it now, where its T2L run is still on disk."""
    cells = []
    for path in sorted((out / "cells").glob("*/cell.json")):
        cell = json.loads(path.read_text())
        run = path.parent / "t2l"
        if "spread" not in cell and (run / "hypernet").is_dir():
            cell["spread"] = adapter_spreads(run)
            path.write_text(json.dumps(cell, indent=1))
        if "ll" not in (cell.get("unseen", {}).get("(c)-(d)") or {}) and (run / "hypernet").is_dir():
            if backfill_likelihood(path.parent):
                cell.update(cell_numbers(run / "report.json"))
                path.write_text(json.dumps(cell, indent=1))
        cells.append(cell)
    return sorted(cells, key=lambda r: (r["tasks"], r["steps"], r.get("seed", 0), r.get("overrides", []),
                                        r.get("t2l_overrides", [])))


def _ll_cells(row: dict) -> str:
    """The answer-likelihood contrasts in cSE, '(d) / (e) / (f) / (g)'."""
    values = [(row.get(label) or {}).get("ll_cse") for label, _ in CONTRASTS]
    return "-" if all(v is None for v in values) else " / ".join("n/a" if v is None else f"{v:+.1f}" for v in values)


def adapter_spreads(t2l_run: Path) -> dict[str, float]:
    """``benchmarks/adapter_spread.py`` on a cell's T2L run: how much its adapters depend on the text."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from adapter_spread import spreads

    return {k: round(v, 4) for k, v in spreads(t2l_run).items()}


def cell_overrides(tasks: list[str], steps: int, args, cell: Path) -> list[str]:
    """What both runs of a cell set on the demo's recipes: the grid point, the cell's folder and, since
    `make demo` leaves it off for time, the answer-likelihood column (the map reports it per cell)."""
    common = [f"data.train_tasks=[{','.join(tasks)}]", f"trainer.max_steps={steps}", f"training.seed={args.seed}",
              f"training.output_dir={cell}", f"trainer.max_time={args.max_time or 'null'}",
              f"trainer.val_check_interval={max(steps, 1)}",
              f"training.checkpoint_every_n_steps={max(steps, 1)}", "eval.answer_loglik=true"]
    if args.eval_instances:
        common.append(f"data.max_eval_instances={args.eval_instances}")
    if args.seen_per_task:
        common.append(f"eval.report_seen_per_task={args.seen_per_task}")
    return common + list(args.set)


def _t2l_sets(args) -> list[str]:
    """The ``--set-t2l`` overrides (an args namespace built by hand may have none)."""
    return list(getattr(args, "set_t2l", []))


def _mt_lora_finished(run: Path) -> bool:
    status = run / "training_status.json"
    return (run / "adapter").is_dir() and status.is_file() and json.loads(status.read_text()).get("mode") == "lora"


def run_cell(n_tasks: int | str, steps: int, args, out: Path) -> dict:
    from t2l_framework.data.demo_task_sets import training_task_set

    t2l_sets = _t2l_sets(args)
    cell = out / "cells" / cell_name(n_tasks, steps, args.seed, args.set, t2l_sets)
    done = cell / "cell.json"
    if done.is_file():
        print(f"[map] {cell.name}: finished earlier, skipped", flush=True)
        return json.loads(done.read_text())
    cell.mkdir(parents=True, exist_ok=True)
    tasks = training_task_set(n_tasks if n_tasks == "all" else int(n_tasks))
    # The multi-task LoRA lives in the cell without the T2L-only levers (this cell when there are none).
    mt_cell = out / "cells" / cell_name(n_tasks, steps, args.seed, args.set)
    mt_cell.mkdir(parents=True, exist_ok=True)
    times, extra = {}, {}
    if _mt_lora_finished(mt_cell / "mt_lora"):
        print(f"[map] {cell.name}: the multi-task LoRA of {mt_cell.name}, trained earlier, is used", flush=True)
        # a resumed cell counts its own run's training; a lever sharing another cell's counts none
        status = json.loads((mt_cell / "mt_lora" / "training_status.json").read_text())
        times["mt_lora_s"] = float(status.get("seconds", 0.0)) if mt_cell == cell else 0.0
    else:
        print(f"[map] {cell.name}: multi-task LoRA ({len(tasks)} tasks, {steps} steps)", flush=True)
        t0 = time.perf_counter()
        rc = fit("smollm2_demo_mtlora", cell_overrides(tasks, steps, args, mt_cell) + ["training.run_name=mt_lora"],
                 mt_cell / "mt_lora.log")
        times["mt_lora_s"] = time.perf_counter() - t0
        if rc not in (0, 3, 4):  # 3 cut short, 4 diverged: still a result, marked in the table
            raise SystemExit(f"[map] {cell.name}: the multi-task LoRA run failed (exit {rc}); see {mt_cell / 'mt_lora.log'}")
    if mt_cell != cell:
        extra["mt_lora_shared_from"] = mt_cell.name
        if not (cell / "mt_lora").exists():
            (cell / "mt_lora").symlink_to(Path("..") / mt_cell.name / "mt_lora", target_is_directory=True)
    print(f"[map] {cell.name}: T2L + the table", flush=True)
    t0 = time.perf_counter()
    rc = fit("smollm2_demo", cell_overrides(tasks, steps, args, cell) + t2l_sets
             + ["training.run_name=t2l", f"eval.baseline_adapter={mt_cell / 'mt_lora' / 'adapter'}"], cell / "t2l.log")
    times["t2l_s"] = time.perf_counter() - t0
    if rc not in (0, 3, 4):
        raise SystemExit(f"[map] {cell.name}: the T2L run failed (exit {rc}); see {cell / 't2l.log'}")
    return _write_cell(cell, n_tasks, len(tasks), steps, args, times, **extra)


def _write_cell(cell: Path, n_tasks: int | str, n: int, steps: int, args, times: dict, **extra) -> dict:
    """The cell's ``cell.json`` from its runs under ``cell/t2l`` and ``cell/mt_lora``: what finishes it."""
    report = json.loads((cell / "t2l" / "report.json").read_text())
    t2l_sets = _t2l_sets(args)
    result = {"tasks": n, "task_set": n_tasks, "steps": steps, "seed": args.seed, "overrides": args.set,
              **({"t2l_overrides": t2l_sets} if t2l_sets else {}),
              "cpu": cpu_kind(), **extra,
              "wall_s": round(sum(times.values()), 1), **{k: round(v, 1) for k, v in times.items()},
              "t2l_time_breakdown_s": report.get("seconds", {}), **cell_numbers(cell / "t2l" / "report.json"),
              "spread": adapter_spreads(cell / "t2l")}
    (cell / "cell.json").write_text(json.dumps(result, indent=1))
    return result


def _setting(recipe, key: str):
    from omegaconf import OmegaConf

    value = OmegaConf.select(recipe, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def record_cell(n_tasks: int | str, steps: int, t2l_run: Path, args, out: Path) -> dict:
    """A cell from a T2L run trained outside the map (e.g. by ``make demo-long``) and the multi-task
    LoRA run its table compared against (the recipe's ``eval.baseline_adapter``). Both runs' recipes
    must be the cell's grid point: its task set, steps and seed, and every ``--set`` value; anything
    else (checkpoint interval, max_time) does not change what is trained. The runs are linked, not
    copied, into the cell folder; the CPU is this machine's, so record on the machine that trained."""
    from omegaconf import OmegaConf
    import yaml

    from t2l_framework.data.demo_task_sets import training_task_set

    t2l_sets = _t2l_sets(args)
    cell = out / "cells" / cell_name(n_tasks, steps, args.seed, args.set, t2l_sets)
    if (cell / "cell.json").is_file():
        raise SystemExit(f"[map] {cell.name} is finished already ({cell / 'cell.json'}); remove it to record again")
    t2l_run = t2l_run.resolve()
    if not (t2l_run / "report.json").is_file():
        raise SystemExit(f"[map] --record {t2l_run}: no report.json there (a T2L run with its end-of-training table)")
    recipe = OmegaConf.load(t2l_run / "recipe.yaml")
    baseline = _setting(recipe, "eval.baseline_adapter")
    mt_run = (ROOT / baseline).resolve().parent if baseline else None
    if mt_run is None or not (mt_run / "recipe.yaml").is_file():
        raise SystemExit(f"[map] --record {t2l_run}: its eval.baseline_adapter ({baseline!r}) is not a run folder's "
                         "adapter/, so the cell would have no (e)")
    tasks = training_task_set(n_tasks if n_tasks == "all" else int(n_tasks))
    both = {"data.train_tasks": tasks, "trainer.max_steps": steps, "training.seed": args.seed,
            **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}}
    t2l_only = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in t2l_sets)}
    for name, run, wanted in (("T2L", t2l_run, {**both, **t2l_only}), ("multi-task LoRA", mt_run, both)):
        have = OmegaConf.load(run / "recipe.yaml")
        for key, value in wanted.items():
            if _setting(have, key) != value:
                raise SystemExit(f"[map] --record: the {name} run {run} has {key}={_setting(have, key)!r}, the cell "
                                 f"{cell.name} needs {value!r}")
    status = json.loads((mt_run / "training_status.json").read_text()) if (mt_run / "training_status.json").is_file() else {}
    cell.mkdir(parents=True, exist_ok=True)
    for link, target in (("t2l", t2l_run), ("mt_lora", mt_run)):
        if not (cell / link).exists():
            (cell / link).symlink_to(target, target_is_directory=True)
    report = json.loads((t2l_run / "report.json").read_text())
    # its training (its own process start is not counted); none for a T2L-only lever, whose (e) is shared
    times = {"mt_lora_s": 0.0 if t2l_sets else float(status.get("seconds", 0.0)),
             "t2l_s": float(sum(report.get("seconds", {}).values()))}
    extra = {"mt_lora_shared_from": mt_run.parent.name if mt_run.parent.parent == (out / "cells").resolve()
             else str(mt_run)} if t2l_sets else {}
    return _write_cell(cell, n_tasks, len(tasks), steps, args, times, **extra,
                       recorded_from={"t2l": str(t2l_run), "mt_lora": str(mt_run)})


def _cse(row: dict, label: str) -> str:
    v = row.get(label) or {}
    return "n/a" if v.get("cse") is None else f"{v['cse']:+.1f}"


def _spread(row: dict) -> str:
    v = row.get("spread") or {}
    if "training tasks" not in v:
        return "-"
    return f"{v['training tasks']:.3f} / " + (f"{v['random letters']:.3f}" if "random letters" in v else "-")


def _overrides(row: dict) -> str:
    """A cell's overrides for the table: T2L-only ones marked, and where its (e) comes from."""
    words = list(row.get("overrides") or []) + [f"T2L: {s}" for s in row.get("t2l_overrides") or []]
    if row.get("mt_lora_shared_from"):
        words.append(f"((e) shared with {row['mt_lora_shared_from']})")
    return " ".join(words) or "-"


def write_table(results: list[dict], out: Path) -> str:
    lines = ["| tasks | steps | seed | overrides | unseen (c) EM | " + " | ".join(f"{l} cSE" for l, _ in CONTRASTS)
             + " | unseen answer log-lik cSE (d) / (e) / (f) / (g) | in-dist (c) EM | in-dist (c)-(e) cSE | "
               "adapter spread: tasks / random letters | wall (T2L + MT-LoRA) | CPU |",
             "|---:|---:|---:|---|---:|" + "---:|" * len(CONTRASTS) + "---:|---:|---:|---:|---:|---|"]
    for r in results:
        u, s = r.get("unseen", {}), r.get("seen", {})
        cut = any(str(v).startswith("cut short") for v in r.get("training", {}).values())
        bad = any(str(v).startswith("DIVERGED") for v in r.get("training", {}).values())
        lines.append(f"| {r['tasks']} | {r['steps']}{' (cut short)' if cut else ''}{' (DIVERGED)' if bad else ''} | "
                     f"{r.get('seed', '-')} | "
                     f"{_overrides(r)} | "
                     f"{u.get('c_em', float('nan')):.3f} ± {u.get('c_em_se', float('nan')):.3f} | "
                     + " | ".join(_cse(u, l) for l, _ in CONTRASTS)
                     + f" | {_ll_cells(u)} | {s.get('c_em', float('nan')):.3f} | {_cse(s, '(c)-(e)')} | {_spread(r)} | "
                     f"{r['wall_s'] / 60:.1f} min | {r['cpu']} |")
    md = "\n".join(lines)
    (out / "scaling_map.md").write_text(md + "\n\nEM = exact match on the unseen set; cSE = the paired difference "
                                        "in task-clustered standard errors (> 2: a clear win of (c)). Answer log-lik: "
                                        "the same paired differences of the reference answers' mean log-probability "
                                        "per token (the quantity training maximises; every item counts). Adapter spread "
                                        "(benchmarks/adapter_spread.py): the share of the generated delta W that "
                                        "differs between the training tasks' held-out descriptions / between random "
                                        "letters of the unseen descriptions' lengths (0 = one adapter for any text).\n")
    (out / "scaling_map.json").write_text(json.dumps(results, indent=1))
    return md


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.6), sharey=True)
    def series(r: dict) -> tuple:  # one line per task count, seed and lever
        return r["tasks"], r.get("seed"), tuple(r.get("overrides") or []) + tuple(f"T2L: {s}" for s in r.get("t2l_overrides") or [])

    for ax, label in zip(axes, PLOTTED):
        for key in sorted({series(r) for r in results}, key=str):
            n, seed, sets = key
            pts = sorted((r["steps"], r["unseen"][label]["cse"]) for r in results
                         if series(r) == key and (r.get("unseen", {}).get(label) or {}).get("cse") is not None)
            if pts:
                ax.plot(*zip(*pts), marker="s" if sets else "o", ls=":" if sets else "-",
                        label=f"{n} tasks, seed {seed}" + (f", {' '.join(sets)}" if sets else ""))
        ax.axhline(2.0, color="grey", ls="--", lw=0.8)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_xscale("log")
        steps = sorted({r["steps"] for r in results})
        ax.set_xticks(steps, [str(n) for n in steps])  # the grid's budgets, not log-scale minor labels
        ax.minorticks_off()
        ax.set_title(f"unseen: {label}")
        ax.set_xlabel("training steps (same for T2L and MT-LoRA)")
    axes[0].set_ylabel("paired difference in cSE (exact match)")
    legend = {}  # every series once, below the panels (inside one, it hides the points)
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    rows = (len(legend) + 1) // 2
    fig.set_size_inches(4.2 * len(PLOTTED), 3.6 + 0.22 * rows)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * rows / (3.6 + 0.22 * rows) + 0.02, 1, 1))
    fig.savefig(out / "scaling_map.png", dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="10,30,all", help="training-task counts (data/demo_tasks.yaml rule), e.g. 10,30,all")
    p.add_argument("--steps", default="96,288,864", help="step budgets, the same for T2L and the multi-task LoRA")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-instances", type=int, default=0,
                   help="test items per unseen task (data.max_eval_instances; 0 = the recipe's 13, 307 items)")
    p.add_argument("--seen-per-task", type=int, default=0, help="in-distribution items per task (0 = the recipe's 4)")
    p.add_argument("--max-time", default="", help="trainer.max_time per run, DD:HH:MM:SS (default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more override for both runs")
    p.add_argument("--set-t2l", action="append", default=[], metavar="KEY=VALUE",
                   help="one more override for T2L alone (hypernet.*, encoder.*, training.lr_head_bias): the cell "
                        "shares the multi-task LoRA of the cell without these, training it there once if needed")
    p.add_argument("--out", default=str(ROOT / "docs" / "scaling_map"), help="output folder (resumable)")
    p.add_argument("--record", default="", metavar="T2L_RUN",
                   help="train nothing: record a T2L run trained outside the map (e.g. runs/smollm2_demo_long, with "
                        "the multi-task LoRA run its recipe's eval.baseline_adapter names) as the cell of --tasks, "
                        "--steps, --seed, --set and --set-t2l, after checking both runs' recipes are that cell")
    args = p.parse_args()
    check_t2l_only(args.set_t2l)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [(n if n == "all" else int(n), int(s)) for n in args.tasks.split(",") for s in args.steps.split(",")]
    if args.record and len(grid) != 1:
        raise SystemExit("[map] --record takes one cell: one --tasks and one --steps value")
    for n, steps in grid:
        if args.record:
            record_cell(n, steps, Path(args.record), args, out)
        else:
            run_cell(n, steps, args, out)
        results = finished_cells(out)
        print(write_table(results, out), flush=True)
        plot(results, out)
    print(f"[map] {len(finished_cells(out))} finished cells; table {out / 'scaling_map.md'}, plot {out / 'scaling_map.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
