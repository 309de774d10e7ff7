"""The one exception type users see; the CLI prints its message without a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class T2LError(Exception):
    """A problem with the user's input (recipe, files, names) described in one message."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    choices = [str(c) for c in choices]
    same_but_case = [c for c in choices if c.lower() == str(word).lower()]
    close = same_but_case or difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
