"""Log-likelihood of answer options, many (context, adapter) rows per forward pass.

Every row carries its own adapter through the batched per-sample LoRA, so base, description-in-
prompt, T2L and PEFT adapters share batches. Only the positions that predict an option's tokens
go through the LM head (a 50k-200k vocabulary at every position would dominate memory). When all
options of a row are one token long (letter answers: "A", "B", ...), one forward scores them
all, as lm-evaluation-harness does.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from t2l_framework.lora.weights import LoraWeights, stack_rows


@dataclass
class OptionsRow:
    """Context token ids, the token ids of each option continuing it, and the row's adapter."""

    context: list[int]
    options: list[list[int]]
    weights: LoraWeights | None = None


def _sequences(rows: Sequence[OptionsRow]) -> list[tuple[int, list[int], list[int], list[list[int]], list[int]]]:
    """(row, option indices, input ids, target positions, target ids per option) per forward row."""
    out = []
    for r, row in enumerate(rows):
        if all(len(o) == 1 for o in row.options):  # one forward scores every option
            out.append((r, list(range(len(row.options))), row.context, [len(row.context) - 1],
                        [o for o in row.options]))
            continue
        for k, option in enumerate(row.options):
            ids = row.context + option[:-1]
            out.append((r, [k], ids, list(range(len(row.context) - 1, len(ids))), [option]))
    return out


def sequence_count(rows: Sequence[OptionsRow]) -> int:
    """How many forward rows ``option_logprobs`` runs for ``rows`` (for progress bars)."""
    return sum(1 if all(len(o) == 1 for o in row.options) else len(row.options) for row in rows)


def _final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.inference_mode()
def option_logprobs(model, injection, rows: Sequence[OptionsRow], batch_size: int = 16, pad_id: int = 0,
                    progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Sum of token log-probabilities of every option of every row: ``[row][option]``.

    Rows are sorted by length so a batch holds similar lengths; each forward row is right-padded
    (causal attention: padding after a token never changes it). progress(n) after each batch.
    """
    seqs = _sequences(rows)
    result = [[0.0] * len(row.options) for row in rows]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][2]))
    device = next(model.parameters()).device
    backbone = model.base_model  # the decoder stack without the LM head
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start:start + batch_size]]
        width = max(len(s[2]) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (_, _, seq, _, _) in enumerate(chunk):
            ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        lora = stack_rows([rows[s[0]].weights for s in chunk])
        with injection.use(lora.to(device)) if lora is not None else nullcontext():
            hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        rows_idx = torch.tensor([j for j, s in enumerate(chunk) for _ in s[3]], device=device)
        pos_idx = torch.tensor([p for s in chunk for p in s[3]], device=device)
        logprobs = torch.log_softmax(_final_logits(model, hidden[rows_idx, pos_idx]), dim=-1).cpu()
        at = 0
        for r, option_idx, _, positions, targets in chunk:
            block = logprobs[at:at + len(positions)]
            at += len(positions)
            for k, option in zip(option_idx, targets):
                if len(positions) == 1:  # single-token options, all from the same position
                    result[r][k] = float(block[0, option[0]])
                else:
                    result[r][k] = float(block[torch.arange(len(option)), torch.tensor(option)].sum())
        if progress:
            progress(len(chunk))
    return result


def encode_continuations(tokenizer, context_text: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each continuation, split where lm-evaluation-harness splits.

    The pair is tokenized as one text and the continuation is what follows the context's own
    tokens; if the context's tokens are not a prefix (a merge across the boundary), the
    continuation is tokenized alone.
    """
    context = list(tokenizer(context_text, add_special_tokens=False)["input_ids"])
    wholes = tokenizer([context_text + c for c in continuations], add_special_tokens=False)["input_ids"]
    options = []
    for text, whole in zip(continuations, wholes):
        whole = list(whole)
        if whole[:len(context)] == context and len(whole) > len(context):
            options.append(whole[len(context):])
        else:
            options.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return context, options


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool = True
                ) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-evaluation-harness 0.4 splits them (``_encode_pair``).

    Trailing spaces of the context move to the continuation; the pair is encoded as one text and
    the continuation is whatever follows as many tokens as the context alone encodes to (no
    check that they are a prefix: a merge across the boundary is scored as the harness scores
    it). ``add_special_tokens``: the tokenizer's own (BOS for Llama/Mistral), as the harness's
    HF model encodes by default.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"])
    return ctx, whole[len(ctx):]
