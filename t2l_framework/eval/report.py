"""The outputs of ``t2l eval``: results JSON, a Markdown table and a PNG bar chart.

Scores are shown in percent, as in the T2L paper. The "avg" column averages each adapter over
the benchmarks that every adapter has a score for, so adapters are compared on the same
benchmarks. Below the scores, each adapter's paired difference against ``base`` (same items;
descriptions averaged per item first) with its paired standard error; the average difference's
SE combines the benchmarks' as independent samples: sqrt(sum se_b^2) / B.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from t2l_framework.atomic import atomic_file


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _ok(value: dict | None) -> bool:
    return value is not None and not math.isnan(value["score"])


def shared_benchmarks(results: dict) -> list[str]:
    """Benchmarks every adapter has a score for, in the results' order."""
    return [b for b in results["benchmarks"] if all(_ok(per.get(b)) for per in results["scores"].values())]


def averages(results: dict) -> dict[str, float]:
    """Mean score per adapter over the shared benchmarks (the paper's "Avg." column); NaN if none."""
    shared = shared_benchmarks(results)
    return {adapter: (sum(per[b]["score"] for b in shared) / len(shared) if shared else float("nan"))
            for adapter, per in results["scores"].items()}


def average_differences(results: dict) -> dict[str, dict[str, float]]:
    """{adapter: {"diff", "se"}}: mean paired difference against base over the shared benchmarks."""
    shared = shared_benchmarks(results)
    out = {}
    for adapter, per in results["scores"].items():
        diffs = [per[b].get("vs_base") for b in shared]
        if not shared or any(d is None for d in diffs):
            continue
        out[adapter] = {"diff": sum(d["diff"] for d in diffs) / len(diffs),
                        "se": math.sqrt(sum(d["se"] ** 2 for d in diffs)) / len(diffs)}
    return out


def _columns(results: dict) -> list[tuple[str, str | None]]:
    """(benchmark, extra metric or None for the main one) per table column."""
    cols = []
    for b, info in results["benchmarks"].items():
        cols.append((b, None))
        cols += [(b, m) for m in info.get("metrics", [])]
    return cols


def _cell(value: dict | None, metric: str | None) -> dict | None:
    if value is None:
        return None
    return value if metric is None else value.get("metrics", {}).get(metric)


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.1f}"


# Metrics that are not shares of items, shown as they are (answer_logprob: nats per token).
UNSCALED_METRICS = ("answer_logprob",)


def _value(x: float, metric: str | None, sign: str = "") -> str:
    if metric in UNSCALED_METRICS:
        return "nan" if math.isnan(x) else f"{x:{sign}.2f}"
    return "nan" if math.isnan(x) else f"{100 * x:{sign}.1f}"


def markdown_table(results: dict) -> str:
    """Adapters x benchmarks (+ avg): score ± SE in percent (``UNSCALED_METRICS`` as they are); then the
    paired differences against base."""
    cols = _columns(results)
    avg, avg_diff = averages(results), average_differences(results)
    head = ["adapter"] + [f"{b} ({m or results['benchmarks'][b]['metric']})" for b, m in cols] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for adapter, per in results["scores"].items():
        cells = [adapter]
        for b, m in cols:
            v = _cell(per.get(b), m)
            cells.append("–" if v is None else f"{_value(v['score'], m)} ± {_value(v['se'], m)}")
        cells.append(f"**{_pct(avg[adapter])}**")
        lines.append("| " + " | ".join(cells) + " |")
    base = results.get("baseline")
    diff_rows = [a for a in results["scores"] if a != base and any(
        (_cell(results["scores"][a].get(b), m) or {}).get("vs_base") for b, m in cols)]
    if base and diff_rows:
        lines += ["", f"Paired difference against `{base}` (same items), ± its paired standard error:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for adapter in diff_rows:
            cells = [f"{adapter} − {base}"]
            for b, m in cols:
                d = (_cell(results["scores"][adapter].get(b), m) or {}).get("vs_base")
                cells.append("–" if d is None else f"{_value(d['diff'], m, '+')} ± {_value(d['se'], m)}")
            d = avg_diff.get(adapter)
            cells.append("–" if d is None else f"**{100 * d['diff']:+.1f} ± {_pct(d['se'])}**")
            lines.append("| " + " | ".join(cells) + " |")
    bench = results["benchmarks"]
    shared = shared_benchmarks(results)
    lines.append("")
    n = ", ".join(f"{b} {bench[b]['n']}" for b in bench)
    protocols = sorted({info.get("protocol", "") for info in bench.values()} - {""})
    notes = [f"Items per benchmark: {n}."]
    if protocols:
        fallback = [b for b, info in bench.items() if info.get("protocol") != results["settings"].get("protocol")]
        notes.append(f"Protocol: {results['settings'].get('protocol')}"
                     + (f" ({', '.join(fallback)} scored under chat, which is all they define)" if fallback else "")
                     + ".")
    notes.append(f"avg: over the {len(shared)} benchmarks every adapter has" if len(shared) != len(bench)
                 else "avg: over all benchmarks")
    notes[-1] += ("; adapters made from descriptions are averaged over "
                  f"{results['settings']['n_descriptions']} descriptions per benchmark; ± is the standard error over items")
    clustered = [b for b, info in bench.items() if info.get("se_clustered_by_task")]
    if clustered:
        notes[-1] += f" (clustered by task for {', '.join(clustered)})"
    notes[-1] += "."
    lines.append(" ".join(notes))
    return "\n".join(lines) + "\n"


def likelihood_table(benchmark: str, tasks: list[str], values: dict[str, list[float]], reference: str) -> str:
    """``t2l eval --likelihood-only``: each adapter's mean answer log-likelihood (nats/token) ± SE, and
    ``reference`` minus each other adapter, paired over the same items, ± its paired SE and in SEs.
    SEs are clustered by task when the items come from several tasks."""
    from t2l_framework.eval.stats import clustered_mean_se, mean_se, paired_difference

    clusters = tasks if len(set(tasks)) > 1 else None
    se_kind = "task-clustered SE" if clusters else "SE"
    lines = [f"**{benchmark}**: answer log-likelihood, nats/token ({len(tasks)} items, {len(set(tasks))} tasks)", "",
             f"| adapter | answer log-lik ± {se_kind} | {reference} minus it | in SEs |", "|---|---:|---:|---:|"]
    for name, v in values.items():
        mean, se = clustered_mean_se(v, clusters) if clusters else mean_se(v)
        if name == reference:
            lines.append(f"| {name} | {mean:.3f} ± {se:.3f} | - | - |")
            continue
        diff, dse = paired_difference(values[reference], v, clusters)
        ratio = f"{diff / dse:+.1f}" if dse > 0 and not math.isnan(dse) else "n/a"
        lines.append(f"| {name} | {mean:.3f} ± {se:.3f} | {diff:+.3f} ± {dse:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    """Left: bars per benchmark and adapter (+ the shared-benchmark average), ± SE. Right: each
    adapter's paired difference against base per benchmark and on average, ± paired SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(results["benchmarks"])
    adapters = list(results["scores"])
    avg, avg_diff = averages(results), average_differences(results)
    base = results.get("baseline")
    diff_adapters = [a for a in adapters if a in avg_diff or any(
        results["scores"][a].get(b, {}).get("vs_base") for b in benches)]
    groups = benches + ["avg"]
    width_in = min(16.0, max(6.0, 0.28 * len(groups) * max(1, len(adapters)) + 3))
    panels = 2 if base and diff_adapters else 1
    fig, axes = plt.subplots(1, panels, figsize=(width_in * (1 if panels == 1 else 1.6), 4.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(adapters))
    for k, adapter in enumerate(adapters):
        scores = [results["scores"][adapter].get(b, {}).get("score", float("nan")) for b in benches] + [avg[adapter]]
        errors = [results["scores"][adapter].get(b, {}).get("se", 0.0) for b in benches] + [0.0]
        xs = [i + (k - (len(adapters) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [100 * s for s in scores], width, yerr=[100 * e for e in errors], capsize=2, label=adapter)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(f"{results['model']['name']}: protocol {results['settings'].get('protocol', '')}")
    ax.grid(axis="y", alpha=0.3)
    if panels == 2:
        dx = axes[0][1]
        width = 0.8 / max(1, len(diff_adapters))
        colors = {a: f"C{adapters.index(a)}" for a in diff_adapters}
        for k, adapter in enumerate(diff_adapters):
            per = results["scores"][adapter]
            diffs = [per.get(b, {}).get("vs_base") or {"diff": float("nan"), "se": 0.0} for b in benches]
            diffs.append(avg_diff.get(adapter, {"diff": float("nan"), "se": 0.0}))
            xs = [i + (k - (len(diff_adapters) - 1) / 2) * width for i in range(len(groups))]
            dx.bar(xs, [100 * d["diff"] for d in diffs], width, yerr=[100 * d["se"] for d in diffs], capsize=2,
                   color=colors[adapter], label=adapter)
        dx.axhline(0, color="black", linewidth=0.8)
        dx.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        dx.set_ylabel(f"difference vs {base} (points)")
        dx.set_title(f"paired difference against {base} (± paired SE)")
        dx.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, predictions: list[dict], out_dir: Path) -> dict[str, Path]:
    """results.json, results.md, results.png and predictions.jsonl under ``out_dir``."""
    results = dict(results, average=averages(results), average_vs_base=average_differences(results),
                   average_over=shared_benchmarks(results))
    files = {"json": out_dir / "results.json", "table": out_dir / "results.md", "plot": out_dir / "results.png",
             "predictions": out_dir / "predictions.jsonl"}
    _atomic_write(files["json"], (json.dumps(results, indent=2) + "\n").encode())
    _atomic_write(files["table"], markdown_table(results).encode())
    _atomic_write(files["predictions"], "".join(json.dumps(p) + "\n" for p in predictions).encode())
    bar_chart(results, files["plot"])
    return files
