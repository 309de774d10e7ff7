"""The PNG of ``t2l inspect``: per description, a layers x modules heat map of its adapter's
norm against the training tasks' (ratio to their median; x = outside their range) and bars of
the nearest training tasks in the encoder's space and by adapter cosine."""

from __future__ import annotations

import textwrap
from pathlib import Path

from t2l_framework.atomic import atomic_file


def inspect_png(rows: list[dict], path: str | Path, task_median: list[list[float]]) -> Path:
    """Write the figure for ``Inspector.inspect`` rows; task_median: [L][M] median training norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(14, 4.6 * n), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1.1, 1.4, 1.4]})
    median = np.asarray(task_median, dtype=float)
    for (ax_map, ax_enc, ax_ad), row in zip(axes, rows):
        norms = np.asarray(row["norms"], dtype=float)  # [L, M]
        lo = np.asarray(row["training_norm_range"]["min"], dtype=float)
        hi = np.asarray(row["training_norm_range"]["max"], dtype=float)
        ratio = norms / np.maximum(median, 1e-12)
        span = max(abs(np.log2(np.maximum(ratio, 1e-6))).max(), 0.25)
        im = ax_map.imshow(np.log2(np.maximum(ratio, 1e-6)), aspect="auto", cmap="coolwarm", vmin=-span, vmax=span,
                           interpolation="nearest")
        for layer, module in zip(*np.nonzero((norms < lo) | (norms > hi))):
            ax_map.text(module, layer, "x", ha="center", va="center", fontsize=7)
        ax_map.set_xticks(range(len(row["modules"])), row["modules"])
        ax_map.set_ylabel("layer")
        ax_map.set_title("log2(||ΔW|| / training median)\nx: outside the training range", fontsize=9)
        fig.colorbar(im, ax=ax_map, fraction=0.05)
        for ax, key, title in ((ax_enc, "nearest_tasks", "nearest training tasks (encoder cosine)"),
                               (ax_ad, "closest_adapters", "closest training adapters (ΔW cosine,\ncentred on the mean-task adapter)")):
            items = row[key][::-1]
            ax.barh([i["task"] for i in items], [i["cosine"] for i in items], color="#2457c5")
            low = min(i["cosine"] for i in items)
            ax.set_xlim(min(0.0, low), 1.0)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="y", labelsize=8)
        head = textwrap.shorten(row["description"], 90)
        enc_title = ax_enc.get_title()
        ax_enc.set_title("")
        ax_enc.set_title(f"\"{head}\"\nfamiliarity {row['familiarity']:.0f}th percentile "
                         f"({row['verdict'].split(':')[0]})\n\n{enc_title}", fontsize=9, loc="left")
    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
