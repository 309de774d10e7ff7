"""Turning (prompt, answer) text into token ids and labels, and padding them into batches.

``format_prompt(user, system) -> str`` is the chat formatting of the base model family (it
ends where the assistant's answer starts); the data code never builds chat text itself.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from t2l_framework.errors import T2LError

IGNORE_INDEX = -100
FormatPrompt = Callable[[str, str], str]


def eos_id(tokenizer) -> int:
    """The tokenizer's end-of-sequence id; training teaches the model to stop with it."""
    if tokenizer.eos_token_id is None:
        raise T2LError("the tokenizer has no eos_token_id; answers must end with an end-of-sequence token")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad token, or EOS when it has none (padding is masked anyway)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def encode_prompt(tokenizer, prompt_text: str, max_prompt_tokens: int) -> list[int]:
    """Prompt token ids, cut from the left so the end of the prompt (the question) survives.

    ``add_special_tokens=False`` because the chat template already holds any BOS token.
    """
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return list(ids[-max_prompt_tokens:]) if max_prompt_tokens > 0 else list(ids)


def pair_budget(n_prompt: int, n_answer: int, max_total: int) -> tuple[int, int]:
    """(prompt tokens, answer tokens) kept when the pair may hold at most ``max_total`` tokens.

    The rule of transformers' fast tokenizers for a (prompt, response) pair with
    ``truncation="longest_first"``, which the T2L reference applies with ``inp_max_len=512``:
    tokens come off the longer sequence first; if both are longer than half the budget, the
    first (the prompt, on a tie too) keeps ``max_total // 2`` and the other the rest.
    ``max_total <= 0`` means no joint limit.
    """
    if max_total <= 0 or n_prompt + n_answer <= max_total:
        return n_prompt, n_answer
    half = max_total // 2
    if n_prompt > n_answer:  # the answer is the shorter one
        keep_answer = half if n_answer > half else n_answer
        return max_total - keep_answer, keep_answer
    keep_prompt = half if n_prompt > half else n_prompt
    return keep_prompt, max_total - keep_prompt


def encode_example(
    tokenizer, prompt_text: str, answer: str, max_prompt_tokens: int, max_answer_tokens: int,
    max_total_tokens: int = 0,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for supervised fine-tuning on the answer only.

    labels are -100 on the prompt tokens, so the loss covers the answer and the EOS after it.
    The prompt is cut from the left, the answer from the right (a truncated answer loses its
    EOS: the model should not learn to stop mid-answer); then ``pair_budget`` applies
    ``max_total_tokens`` to the pair (0 = no joint limit).
    """
    return encode_examples(tokenizer, [prompt_text], [answer], max_prompt_tokens, max_answer_tokens,
                           max_total_tokens)[0]


def encode_examples(
    tokenizer, prompts: Sequence[str], answers: Sequence[str], max_prompt_tokens: int, max_answer_tokens: int,
    max_total_tokens: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """``encode_example`` over many pairs with one tokenizer call each for prompts and answers."""
    if not prompts:
        return []
    if max_total_tokens < 0:
        raise T2LError(f"data.max_total_tokens: expected 0 (no joint limit) or a positive integer, got {max_total_tokens}")
    eos = eos_id(tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    out = []
    for prompt, answer in zip(prompt_ids, answer_ids):
        prompt = list(prompt[-max_prompt_tokens:]) if max_prompt_tokens > 0 else list(prompt)
        answer = (list(answer) + [eos])[:max_answer_tokens]
        keep_prompt, keep_answer = pair_budget(len(prompt), len(answer), max_total_tokens)
        prompt, answer = prompt[len(prompt) - keep_prompt:], answer[:keep_answer]
        out.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out


def pad_batch(examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs to the longest one.

    Returns input_ids [B, T] long, attention_mask [B, T] long, labels [B, T] long (-100 on padding).
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
