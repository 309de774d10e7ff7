"""Greedy generation for a batch of prompts, each row with its own adapter (or none)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from t2l_framework.lora.weights import LoraWeights


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids [batch, max_len] and attention_mask, for decoder-only generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], injection=None,
                    weights: LoraWeights | None = None, max_new_tokens: int = 32) -> list[str]:
    """Decode each prompt greedily to text; row i uses adapter i of ``weights`` (batch 1: all rows)."""
    rows = None
    if weights is not None:
        rows = [weights] * len(prompts) if weights.batch_size == 1 else [weights.select(i) for i in range(len(prompts))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = greedy_decode(model, prompts, rows, injection, max_new_tokens, [tokenizer.eos_token_id], pad)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def prompt_ids_from_batch(batch: dict) -> list[list[int]]:
    """Prompt tokens of a training-format batch (right padded, labels -100 on the prompt)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        answer = (labels != -100).nonzero()
        end = int(answer[0]) if len(answer) else int(ids.shape[0])
        prompts.append(ids[:end].tolist())
    return prompts


@torch.inference_mode()
def greedy_decode(model, prompts: Sequence[Sequence[int]], rows: Sequence[LoraWeights | None] | None = None,
                  injection=None, max_new_tokens: int = 32, eos_ids: Sequence[int] = (), pad_id: int = 0,
                  stop: Sequence[str] = (), tokenizer=None) -> list[list[int]]:
    """Greedy answers (token ids, EOS not included) for a batch; row i uses adapter ``rows[i]``.

    stop: texts that also end a row (kept in its answer), e.g. the closing fence of a code
    block; they are looked for in the decoded last tokens, so ``tokenizer`` is needed with them.

    Unlike ``model.generate``, rows that have finished (EOS or their limit) leave the batch: their
    KV cache, mask and LoRA rows are dropped, so a batch of short and long answers costs what
    its long answers cost, not batch size x the longest answer. Evaluation batches mix adapters
    whose answers differ a lot in length (a T2L adapter answering "B" next to a base model
    explaining itself), so this matters.
    """
    from transformers import DynamicCache

    from t2l_framework.lora.weights import stack_rows

    n = len(prompts)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    lora = stack_rows(list(rows)) if rows is not None else None
    lora = lora.to(device) if lora is not None else None
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)
    answers: list[list[int]] = [[] for _ in range(n)]
    alive = torch.arange(n, device=device)  # original row of each batch row
    if stop and tokenizer is None:
        raise ValueError("greedy_decode: stop texts need the tokenizer")
    window = 2 + max((len(s) for s in stop), default=0)  # tokens: at least one character each
    step_ids, step_pos = ids, positions
    for step in range(max_new_tokens):
        with injection.use(lora) if lora is not None else nullcontext():
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1)
        done = torch.isin(token, eos)
        for k, (row, tok, fin) in enumerate(zip(alive.tolist(), token.tolist(), done.tolist())):
            if not fin:
                answers[row].append(tok)
                if stop and any(s in tokenizer.decode(answers[row][-window:]) for s in stop):
                    done[k] = True
        keep = (~done).nonzero().squeeze(-1)
        if len(keep) == 0 or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            cache.batch_select_indices(keep)
            alive, token, mask, step_pos = alive[keep], token[keep], mask[keep], step_pos[keep]
            if lora is not None and lora.batch_size > 1:
                lora = lora.select(keep)
        step_ids = token[:, None]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        step_pos = step_pos[:, -1:] + 1
    return answers
