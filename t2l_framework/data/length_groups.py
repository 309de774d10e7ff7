"""Length-grouped batches: the rows of a window of batches regrouped so each batch pads little.

Batches are right-padded to their longest row, so a batch that mixes a 30-token and a
200-token example spends most of its compute on padding. Sorting the rows of several
consecutive batches by length and cutting the sorted list into batches of the same size keeps
exactly the same examples (the same multiset over the window) while each batch holds rows of
similar length; the batches of a window are then put in a seeded random order, so long and
short steps alternate instead of following the sort.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

import torch

Row = TypeVar("Row")


def group_by_length(rows: Sequence[Row], lengths: Sequence[int], batch_size: int, rng: random.Random,
                    max_tokens: int = 0) -> list[list[Row]]:
    """``rows`` regrouped into batches of similar ``lengths``.

    max_tokens = 0: batches of ``batch_size`` rows (the last may be smaller). max_tokens > 0
    (throughput mode): as many rows per batch as fit ``rows x longest <= max_tokens`` padded
    tokens (a row longer than that is a batch alone), so the count of batches varies.
    Ties are broken at random (``rng``) so equal-length rows of different tasks still mix;
    the batch order is shuffled with the same ``rng``. Deterministic for a given rng state.
    """
    order = list(range(len(rows)))
    rng.shuffle(order)
    order.sort(key=lambda r: lengths[r])  # stable: equal lengths keep their shuffled order
    if max_tokens > 0:
        cuts, size = [0], 0
        for k, r in enumerate(order):  # ascending lengths: the row being added is the longest so far
            if size and (size + 1) * lengths[r] > max_tokens:
                cuts.append(k)
                size = 0
            size += 1
        spans = zip(cuts, cuts[1:] + [len(order)])
    else:
        spans = ((k, k + batch_size) for k in range(0, len(order), batch_size))
    batches = [[rows[r] for r in order[a:b]] for a, b in spans]
    rng.shuffle(batches)
    return batches


def padding_fraction(attention_mask: torch.Tensor) -> float:
    """Share of the padded positions: attention_mask ``[batch, seq]`` (1 = token, 0 = padding)."""
    return 1.0 - float(attention_mask.sum()) / max(1, attention_mask.numel())
