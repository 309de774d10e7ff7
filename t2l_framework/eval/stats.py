"""Means with standard errors: plain, clustered (items of one task are not independent), paired.

The cluster-robust standard error of a mean treats each cluster (task) as the unit of
independence: with cluster sums of residuals ``s_g``, ``var = G / (G - 1) * sum(s_g^2) / n^2``
(the CR1 small-sample correction; equals the usual SE when every item is its own cluster, up
to ``n / (n - 1)`` vs ``G / (G - 1)``, which are then the same).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Hashable, Sequence


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) treating items as independent; NaNs for no items."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def clustered_mean_se(values: Sequence[float], clusters: Sequence[Hashable]) -> tuple[float, float]:
    """(mean, cluster-robust SE) of ``values``; ``clusters[i]`` names item i's cluster (e.g. its task).

    With one cluster the SE is undefined and NaN is returned for it.
    """
    if len(values) != len(clusters):
        raise ValueError(f"clustered_mean_se: {len(values)} values but {len(clusters)} cluster labels")
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    sums: dict[Hashable, float] = defaultdict(float)
    for v, c in zip(values, clusters):
        sums[c] += v - mean
    g = len(sums)
    if g < 2:
        return mean, float("nan")
    var = g / (g - 1) * sum(s * s for s in sums.values()) / (n * n)
    return mean, math.sqrt(var)


def paired_difference(a: Sequence[float], b: Sequence[float],
                      clusters: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """(mean of a - b, its SE) over the same items; clustered by ``clusters`` when given."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} items; pairs need the same items")
    diffs = [x - y for x, y in zip(a, b)]
    return clustered_mean_se(diffs, clusters) if clusters is not None else mean_se(diffs)
