"""Prefix KV cache: the chat template's fixed head is prefilled once per adapter, not per request.

Every chat prompt of a runtime starts with the same tokens (the template's system turn and the
opening of the user turn: about half of a short SmolLM2 prompt). Their keys and values depend on
the row's adapter (LoRA on ``v_proj`` changes V) but not on the request, so they are computed once
per adapter (or once for the base model) and reused: a batch then prefills only what follows.

Rows are laid out as ``[prefix | left padding | rest]``: every row's prefix sits at positions
0..P-1, where its cached KV was computed; the attention mask hides the padding and ``generate``
derives position ids from the mask, so the rest of a row is at the positions it would have had
without padding. The answers equal those decoded without the cache (tests/test_prefix_cache.py).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Sequence

import torch

from t2l_framework.lora.weights import LoraWeights, stack_rows

Key = tuple[int, int] | None  # (id of the LoraWeights, row in it), None = base model
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, P, head_dim]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return list(a[:n])


class PrefixCache:
    """KV of ``prefix`` (token ids) per adapter, least recently used first out.

    An adapter is known by its ``LoraWeights`` object (and row): the cache holds a weak reference
    and recomputes when that object is gone, so a new adapter can never pick up another's KV.
    """

    def __init__(self, prefix: Sequence[int], capacity: int = 64):
        self.prefix = list(prefix)
        self.capacity = max(1, int(capacity))
        self.items: OrderedDict[Key, tuple[weakref.ref | None, KV]] = OrderedDict()
        self.hits = self.misses = 0

    def usable(self, ids: Sequence[Sequence[int]]) -> bool:
        """True when every row starts with the prefix and has at least one token after it."""
        p = len(self.prefix)
        return p > 0 and all(len(r) > p and list(r[:p]) == self.prefix for r in ids)

    def _lookup(self, key: Key, owner) -> KV | None:
        item = self.items.get(key)
        if item is None or (item[0] is not None and item[0]() is not owner):
            return None
        self.items.move_to_end(key)
        return item[1]

    @torch.inference_mode()
    def kv(self, model, injection, rows: Sequence[tuple[Key, LoraWeights | None, object]]):
        """A ``DynamicCache`` of the prefix for a batch; row i: (key, batch-1 weights or None, owner).

        Missing entries are prefilled in one forward over the missing adapters.
        """
        from transformers import DynamicCache

        found = [self._lookup(key, owner) for key, _, owner in rows]
        missing = list(OrderedDict((key, (w, owner)) for (key, w, owner), kv in zip(rows, found) if kv is None).items())
        self.hits += len(rows) - len(missing)  # rows served without a prefill of their own
        self.misses += len(missing)
        if missing:
            device = next(model.parameters()).device
            ids = torch.tensor([self.prefix] * len(missing), device=device)
            lora = stack_rows([w for _, (w, _) in missing])
            cache = DynamicCache(config=model.config)
            if lora is not None:
                with injection.use(lora.to(device)):
                    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            made = {}
            for j, (key, (_, owner)) in enumerate(missing):
                made[key] = [(layer.keys[j:j + 1].clone(), layer.values[j:j + 1].clone()) for layer in cache.layers]
                self.items[key] = (weakref.ref(owner) if owner is not None else None, made[key])
                self.items.move_to_end(key)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
            found = [kv if kv is not None else made[key] for (key, _, _), kv in zip(rows, found)]
        layers = [(torch.cat([kv[i][0] for kv in found]), torch.cat([kv[i][1] for kv in found]))
                  for i in range(len(found[0]))]
        return DynamicCache(ddp_cache_data=layers, config=model.config)

    def stats(self) -> dict:
        return {"prefix_tokens": len(self.prefix), "size": len(self.items), "hits": self.hits, "misses": self.misses}
