"""Description-sensitivity controls: what a T2L adapter is generated from instead of the task's
own description, to show how much of its effect comes from what the description says.

(d) ``other_task_description``: a description of another task of the same group, seeded;
(f) ``random_description``: random letters where the description has letters, its spaces kept,
    so it has the same length and word lengths and says nothing;
(g) ``GENERIC_DESCRIPTION``: one sentence for every task, so every task gets the same adapter.

The end-of-training table and ``t2l eval`` both make them in ``eval.harness``
(``DESCRIPTION_CONTROLS``), so the controls mean the same thing in both.
"""

from __future__ import annotations

import random
import string
from typing import Hashable, Mapping, Sequence

GENERIC_DESCRIPTION = "Answer the question."


def other_task_description(key: Hashable, task: str, group: Sequence[str],
                           descriptions: Mapping[str, Sequence[str]]) -> str:
    """A description of a task of ``group`` other than ``task``, the same for the same ``key``.

    ``descriptions[t]``: the descriptions a control may draw for task t. A group of one task
    has no other task: the caller refuses it (the harness) or leaves the control out (the table).
    """
    rng = random.Random(str(key))
    other = rng.choice([t for t in group if t != task] or [task])
    return rng.choice(list(descriptions[other]))


def random_description(description: str, seed: int = 0) -> str:
    """Random lowercase letters, one per non-space character of ``description``, spaces kept:
    ``len(result) == len(description)``; the same text and seed give the same letters."""
    rng = random.Random(f"{seed}-random-description-{description}")
    return "".join(c if c.isspace() else rng.choice(string.ascii_lowercase) for c in description)
