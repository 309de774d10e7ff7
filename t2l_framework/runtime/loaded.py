"""``T2LRuntime``: a loaded run, ready to answer prompts (``t2l_framework.assembly.load_runtime`` builds it).

A runtime holds the frozen base model (with batched LoRA injected once), its tokenizer and
chat format, and the ``AdapterGenerator`` (text encoder + hypernetwork). It exports adapters
as PEFT folders and chats with a batch of prompts where every row may carry its own adapter
or none (base model).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from t2l_framework.errors import T2LError
from t2l_framework.lora.peft_io import export_peft_adapter
from t2l_framework.lora.batched import inject_lora
from t2l_framework.lora.weights import LoraWeights, stack_rows
from t2l_framework.runtime.adapters import AdapterGenerator
from t2l_framework.runtime.decoding import RowLimits, RowStreamer, RowTemperature, cut_row
from t2l_framework.runtime.greedy import left_pad
from t2l_framework.runtime.prefix import PrefixCache, common_prefix

Messages = list[dict]  # OpenAI-style [{"role": "system" | "user" | "assistant", "content": str}]
RowWeights = LoraWeights | Sequence[LoraWeights | None] | None


@dataclass
class Completion:
    """One row's answer: text (without EOS), 'stop' or 'length', and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _row_keys(weights: RowWeights, n: int) -> list[tuple]:
    """Per row: (prefix-cache key, batch-1 weights or None, the object that owns them)."""
    if weights is None:
        return [(None, None, None)] * n
    if isinstance(weights, LoraWeights):
        if weights.batch_size == 1:
            return [((id(weights), 0), weights, weights)] * n
        return [((id(weights), i), weights.select(i), weights) for i in range(n)]
    return [(None, None, None) if w is None else ((id(w), 0), w, w) for w in weights]


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], int)


class T2LRuntime:
    """Base model + injected LoRA (+ the hypernetwork that makes adapters), ready for generation.

    generator: None for a bare base model (PEFT adapters only). prefix_cache: reuse the chat
    template's prefilled head per adapter (``runtime/prefix.py``; same answers, less prefill).

    Not thread-safe: model, hypernetwork, injection, prefix cache and ``self.tokenizer`` are used
    by one thread at a time (the server's model worker). Two exceptions are safe from any thread:
    the plain attributes set here and never changed (``name``, ``identity``, ``base_model_name``,
    ``device``, ``context``, ...), and the callables of ``request_encoder`` and ``adapter_writer``,
    which own what they touch.
    """

    def __init__(self, base, injection, generator: AdapterGenerator | None = None, chat_template: bool = True,
                 dtype: str = "", prefix_cache: bool = True):
        self.base, self.model, self.tokenizer = base, base.model, base.tokenizer
        self.injection, self.generator = injection, generator
        self.chat_template, self.dtype = chat_template, dtype
        self.identity = generator.identity if generator else ""
        self.name = generator.name if generator else base.name_or_path
        self.device = next(self.model.parameters()).device
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = [self.tokenizer.eos_token_id] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = {int(e) for e in eos if e is not None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.use_prefix_cache = prefix_cache
        self._prefix_cache: PrefixCache | None = None

    @property
    def base_model_name(self) -> str:
        return self.base.name_or_path

    @property
    def hypernet(self):
        return self.generator.hypernet if self.generator else None

    # --- adapters --------------------------------------------------------------------------

    def adapters(self, descriptions: Sequence[str]) -> LoraWeights:
        """``AdapterGenerator.adapters`` of this run's hypernetwork: A[m]: [n, layers, r, in]."""
        if self.generator is None:
            raise T2LError("this runtime has no hypernetwork (it was loaded from a recipe, not a run folder)")
        return self.generator.adapters(descriptions)

    def retarget(self, target_modules: Sequence[str]) -> None:
        """Re-inject LoRA so that it covers ``target_modules`` too (e.g. a PEFT adapter's)."""
        current = list(self.injection.shapes.modules) if self.injection else []
        wanted = current + [t for t in target_modules if t not in current]
        if wanted == current:
            return
        if self.injection is not None:
            self.injection.remove()
        self.injection = inject_lora(self.model, wanted, self.base.family)

    def export(self, descriptions: Sequence[str] | LoraWeights, out_dirs: Sequence[str | Path]) -> list[Path]:
        """Write one PEFT adapter folder per description (or per row of given weights)."""
        weights = descriptions if isinstance(descriptions, LoraWeights) else self.adapters(descriptions)
        if weights.batch_size != len(out_dirs):
            raise T2LError(f"{weights.batch_size} adapters but {len(out_dirs)} output folders")
        return [self.adapter_writer(weights.select(i))(d) for i, d in enumerate(out_dirs)]

    def adapter_writer(self, weights: LoraWeights) -> Callable[[str | Path], Path]:
        """``out_dir -> PEFT folder`` for batch-1 ``weights`` (A[m]: [1, layers, r, in], B[m]:
        [1, layers, out, r]), safe to call on any thread.

        This call is the part that touches the runtime (the injection's module paths, the
        weights on the model's device), so it belongs on the model thread; the writer it returns
        holds its own CPU copy of the factors and of the paths, so writing and zipping can run
        elsewhere while the model thread decodes."""
        if weights.batch_size != 1:
            raise T2LError(f"adapter_writer writes one adapter; got a batch of {weights.batch_size}")
        own = weights.with_factors({m: a.detach().to("cpu", copy=True) for m, a in weights.A.items()},
                                   {m: b.detach().to("cpu", copy=True) for m, b in weights.B.items()})
        paths = {target: list(p) for target, p in self.injection.paths.items()}
        return partial(export_peft_adapter, own, base_model_name_or_path=self.base_model_name, paths=paths)

    # --- chat ------------------------------------------------------------------------------

    def format(self, prompt: str | Messages, tokenizer=None) -> str:
        """Chat text for a user prompt or a message list, ending where the answer starts
        (tokenizer: whose chat template; default ``self.tokenizer``)."""
        family, tok = self.base.family, tokenizer or self.tokenizer
        if isinstance(prompt, str):
            return family.format_prompt(tok, prompt, chat_template=self.chat_template)
        roles = [m["role"] for m in prompt]
        if not prompt or roles[-1] != "user":
            raise T2LError("messages must end with a user message")
        if roles[:-1] in ([], ["system"]):  # the common case goes through the family's own format
            system = prompt[0]["content"] if len(prompt) == 2 else ""
            return family.format_prompt(tok, prompt[-1]["content"], system, chat_template=self.chat_template)
        if not (self.chat_template and getattr(tok, "chat_template", None)):
            names = {"system": "", "user": "User: ", "assistant": "Assistant: "}
            return "\n".join(names[m["role"]] + m["content"] for m in prompt) + "\nAssistant:"
        messages = [dict(m) for m in prompt]
        if messages[0]["role"] == "system" and not family.system_role:  # fold into the first user turn
            system = messages.pop(0)["content"]
            messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **family.template_kwargs)

    def encode(self, prompt: str | Messages, max_new_tokens: int = 0, tokenizer=None) -> list[int]:
        """Prompt token ids; T2LError when prompt + answer would not fit the model's context."""
        tok = tokenizer or self.tokenizer
        ids = list(tok(self.format(prompt, tok), add_special_tokens=False)["input_ids"])
        if self.context and len(ids) + max_new_tokens > self.context:
            raise T2LError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's "
                           f"context of {self.context} tokens")
        return ids

    def request_encoder(self) -> Callable[..., list[int]]:
        """``encode`` for another thread (the server's tokenizer thread), on a private copy of the
        tokenizer: a fast tokenizer may change its own truncation and padding state when called,
        so it is never shared with the model thread, which decodes with ``self.tokenizer``. The
        rest of what ``encode`` reads (family, chat-template flag, context) is fixed at construction."""
        return partial(self.encode, tokenizer=copy.deepcopy(self.tokenizer))

    def _row_weights(self, weights: RowWeights, n: int) -> LoraWeights | None:
        """One LoraWeights for the batch: batch 1 when every row shares it, zeros for base rows."""
        if weights is None or isinstance(weights, LoraWeights):
            if weights is not None and weights.batch_size not in (1, n):
                raise T2LError(f"{weights.batch_size} adapters for {n} prompts")
            return weights
        rows = list(weights)
        if len(rows) != n:
            raise T2LError(f"{len(rows)} adapters (or None) for {n} prompts")
        return stack_rows(rows)

    def prefix_cache(self) -> PrefixCache | None:
        """The chat template's fixed head (tokens every formatted prompt starts with) and its KV
        per adapter; None when disabled or the template has no common head."""
        if not self.use_prefix_cache:
            return None
        if self._prefix_cache is None:
            # The template's text before the user's, as tokens; cut to what two prompts that
            # share no text really start with (a tokenizer may merge across the boundary).
            mark = "\u2063T2L\u2063"
            text = self.format(mark)
            head = self.tokenizer(text[:text.index(mark)], add_special_tokens=False)["input_ids"]
            for probe in ("a", "Z 1"):
                head = common_prefix(head, self.encode(probe))
            self._prefix_cache = PrefixCache(head)
        return self._prefix_cache if self._prefix_cache.prefix else None

    @torch.inference_mode()
    def chat(self, prompts: Sequence[str | Messages | list[int]], weights: RowWeights = None,
             max_new_tokens: int | Sequence[int] = 64, temperature: float | Sequence[float] = 0.0,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Answer a batch of prompts in one ``generate`` call, row i with adapter i.

        prompts: user text, message lists, or token ids from ``encode``. weights: None (base
        model for all), LoraWeights of batch 1 (shared) or len(prompts), or a list with a
        batch-1 LoraWeights or None (base) per row. max_new_tokens / temperature: one value
        or one per row (temperature 0 = greedy). on_text(row, delta): streamed text.
        """
        from transformers import LogitsProcessorList, StoppingCriteriaList

        n = len(prompts)
        if n == 0:
            return []
        per_row = lambda v: [v] * n if isinstance(v, (int, float)) else list(v)  # noqa: E731
        max_new, temps = per_row(max_new_tokens), per_row(temperature)
        ids = [list(p) if _is_ids(p) else self.encode(p, max(max_new)) for p in prompts]
        lora = self._row_weights(weights, n)
        cache = self.prefix_cache()
        if cache is not None and cache.usable(ids):
            p = len(cache.prefix)
            rest, rest_mask = left_pad([r[p:] for r in ids], self.pad_id, self.device)
            input_ids = torch.cat([torch.tensor([cache.prefix] * n, device=self.device), rest], 1)
            mask = torch.cat([torch.ones_like(rest_mask[:, :1]).expand(n, p), rest_mask], 1)
            past = {"past_key_values": cache.kv(self.model, self.injection, _row_keys(weights, n))}
        else:
            input_ids, mask = left_pad(ids, self.pad_id, self.device)
            past = {}
        sample = any(t > 0 for t in temps)
        extra = {"logits_processor": LogitsProcessorList([RowTemperature(temps)]), "temperature": 1.0,
                 "top_k": 0, "top_p": 1.0} if sample else {}
        streamer = RowStreamer(self.tokenizer, max_new, self.eos_ids, on_text) if on_text else None
        with self.injection.use(lora.to(self.device)) if lora is not None else nullcontext():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max(max_new), do_sample=sample,
                pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), streamer=streamer,
                stopping_criteria=StoppingCriteriaList([RowLimits(input_ids.shape[1], max_new, self.eos_ids)]),
                **extra, **past)
        results = []
        for i in range(n):
            tokens, reason = cut_row(out[i, input_ids.shape[1]:].tolist(), max_new[i], self.eos_ids)
            results.append(Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), reason,
                                      len(ids[i]), len(tokens)))
        return results
