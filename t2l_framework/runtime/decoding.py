"""Per-row decoding controls for one ``model.generate`` call over a mixed batch.

Requests that share a batch differ in temperature, token budget and whether they stream;
``generate`` takes one value of each, so these hooks apply the per-row settings:

- ``RowTemperature``: temperature per row; a row at 0 decodes greedily even when others sample.
- ``RowLimits``: stops each row at its own ``max_new_tokens`` or at an end-of-sequence id.
- ``RowStreamer``: hands each row's new text to a callback as it is decoded.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer


def cut_row(tokens: Sequence[int], max_new: int, eos_ids: set[int]) -> tuple[list[int], str]:
    """A row's answer tokens (without EOS) and its finish reason: 'stop' (EOS) or 'length'."""
    out = []
    for tok in list(tokens)[:max_new]:
        if int(tok) in eos_ids:
            return out, "stop"
        out.append(int(tok))
    return out, "length"


class RowTemperature(LogitsProcessor):
    """scores / t per row; rows with t == 0 keep only their argmax, so sampling picks it."""

    def __init__(self, temperatures: Sequence[float]):
        self.t = torch.tensor([float(t) for t in temperatures])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = self.t.to(scores.device)
        greedy = t == 0
        scores = scores / torch.where(greedy, torch.ones_like(t), t)[:, None].to(scores.dtype)
        if greedy.any():
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep.scatter_(1, scores.argmax(-1, keepdim=True), True)
            scores = torch.where(greedy[:, None] & ~keep, torch.finfo(scores.dtype).min, scores)
        return scores


class RowLimits(StoppingCriteria):
    """Done per row once it has ``max_new[i]`` new tokens or its last token is an EOS id."""

    def __init__(self, prompt_len: int, max_new: Sequence[int], eos_ids: set[int]):
        self.prompt_len = prompt_len
        self.max_new = torch.tensor([int(m) for m in max_new])
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1]
        return (self.max_new.to(last.device) <= n_new) | torch.isin(last, self.eos.to(last.device))


class RowStreamer(BaseStreamer):
    """Calls ``on_text(row, delta)`` with each row's newly decoded text, step by step.

    Text is re-decoded from the row's tokens each step (answers are short) so multi-token
    characters and merged word pieces come out right; a trailing partial character is held
    back until it completes.
    """

    def __init__(self, tokenizer, max_new: Sequence[int], eos_ids: set[int],
                 on_text: Callable[[int, str], None]):
        self.tokenizer = tokenizer
        self.max_new = list(max_new)
        self.eos_ids = eos_ids
        self.on_text = on_text
        self.tokens: list[list[int]] = [[] for _ in max_new]
        self.sent = [""] * len(self.max_new)
        self.done = [False] * len(self.max_new)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        for row, tok in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if tok in self.eos_ids:
                self.done[row] = True
                continue
            self.tokens[row].append(tok)
            self.done[row] = len(self.tokens[row]) >= self.max_new[row]
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(self.sent[row]):
                continue
            delta, self.sent[row] = text[len(self.sent[row]):], text
            if delta:
                self.on_text(row, delta)

    def end(self) -> None:
        """Nothing to flush: the caller sends whatever the final decode adds beyond ``sent``."""
