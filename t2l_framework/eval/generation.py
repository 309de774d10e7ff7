"""Greedy generation for a batch of prompts, each row with its own adapter (or none)."""

from __future__ import annotations

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


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], injection=None,
                    weights: LoraWeights | None = None, max_new_tokens: int = 32) -> list[str]:
    """Decode each prompt greedily; row i uses adapter i of ``weights`` (or the base model)."""
    from contextlib import nullcontext

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad, device)
    ctx = injection.use(weights.to(device)) if weights is not None else nullcontext()
    with ctx:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def prompt_ids_from_batch(batch: dict) -> list[list[int]]:
    """Prompt tokens of a training-format batch (right padded, labels -100 on the prompt)."""
    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        answer = (labels != -100).nonzero()
        end = int(answer[0]) if len(answer) else int(ids.shape[0])
        prompts.append(ids[:end].tolist())
    return prompts
