"""Exact match and ROUGE-L for short generated answers (SNI-style scoring)."""

from __future__ import annotations

import re
import string
from typing import Sequence

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    p = normalize(prediction)
    return float(any(p == normalize(r) for r in references))


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F1 over the references."""
    return max((_SCORER.score(r, prediction)["rougeL"].fmeasure for r in references), default=0.0)
