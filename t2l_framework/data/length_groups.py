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


def group_by_length(rows: Sequence[Row], lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[Row]]:
    """``rows`` regrouped into batches of ``batch_size`` (the last may be smaller) of similar ``lengths``.

    Ties are broken at random (``rng``) so equal-length rows of different tasks still mix;
    the batch order is shuffled with the same ``rng``. Deterministic for a given rng state.
    """
    order = list(range(len(rows)))
    rng.shuffle(order)
    order.sort(key=lambda r: lengths[r])  # stable: equal lengths keep their shuffled order
    batches = [[rows[r] for r in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(attention_mask: torch.Tensor) -> float:
    """Share of the padded positions: attention_mask ``[batch, seq]`` (1 = token, 0 = padding)."""
    return 1.0 - float(attention_mask.sum()) / max(1, attention_mask.numel())
