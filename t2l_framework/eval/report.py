"""The outputs of ``t2l eval``: results JSON, a Markdown table and a PNG bar chart.

Scores are shown in percent, as in the T2L paper, with the average over the benchmarks in the
last column (over the benchmarks every adapter has a score for).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def averages(results: dict) -> dict[str, float]:
    """Mean score per adapter over the benchmarks (the paper's "Avg." column)."""
    out = {}
    for adapter, per_bench in results["scores"].items():
        values = [v["score"] for v in per_bench.values() if not math.isnan(v["score"])]
        out[adapter] = sum(values) / len(values) if values else float("nan")
    return out


def markdown_table(results: dict) -> str:
    """Adapters x benchmarks (+ average), score ± standard error in percent."""
    benches = list(results["benchmarks"])
    avg = averages(results)
    head = ["adapter"] + [f"{b} ({results['benchmarks'][b]['metric']})" for b in benches] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for adapter, per_bench in results["scores"].items():
        cells = [adapter]
        for b in benches:
            v = per_bench.get(b)
            cells.append("–" if v is None else f"{100 * v['score']:.1f} ± {100 * v['se']:.1f}")
        cells.append(f"**{100 * avg[adapter]:.1f}**")
        lines.append("| " + " | ".join(cells) + " |")
    n = ", ".join(f"{b} {results['benchmarks'][b]['n']}" for b in benches)
    lines.append("")
    lines.append(f"Items per benchmark: {n}. Adapters made from descriptions are averaged over "
                 f"{results['settings']['n_descriptions']} descriptions per benchmark; ± is the standard error over items.")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    """Grouped bars: one group per benchmark (and the average), one bar per adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(results["benchmarks"])
    adapters = list(results["scores"])
    avg = averages(results)
    groups = benches + ["avg"]
    width = 0.8 / max(1, len(adapters))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.28 * len(groups) * max(1, len(adapters)) + 3)), 4.5))
    for k, adapter in enumerate(adapters):
        scores = [results["scores"][adapter].get(b, {}).get("score", float("nan")) for b in benches] + [avg[adapter]]
        errors = [results["scores"][adapter].get(b, {}).get("se", 0.0) for b in benches] + [0.0]
        xs = [i + (k - (len(adapters) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [100 * s for s in scores], width, yerr=[100 * e for e in errors], capsize=2, label=adapter)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(f"{results['model']['name']}: {results['settings'].get('scoring', '')} scoring")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(results: dict, predictions: list[dict], out_dir: Path) -> dict[str, Path]:
    """results.json, results.md, results.png and predictions.jsonl under ``out_dir``."""
    results = dict(results, average=averages(results))
    files = {"json": out_dir / "results.json", "table": out_dir / "results.md", "plot": out_dir / "results.png",
             "predictions": out_dir / "predictions.jsonl"}
    _atomic_write(files["json"], (json.dumps(results, indent=2) + "\n").encode())
    _atomic_write(files["table"], markdown_table(results).encode())
    _atomic_write(files["predictions"], "".join(json.dumps(p) + "\n" for p in predictions).encode())
    bar_chart(results, files["plot"])
    return files
