"""Model families: which ``config.model_type`` values a family covers, how to load it, which
projections are fused and how a prompt is chat-formatted.

Families are plugins (``t2l_register_base_models``); the built-ins below are registered
through that same hook; the assembly layer hands the registered ones to ``find_family`` /
``get_family``, so third-party families are found without this module asking the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from t2l_framework.errors import T2LError, did_you_mean


@dataclass(frozen=True)
class ModelFamily:
    """How the framework treats one family of causal LMs.

    model_types: ``config.model_type`` values this family covers.
    system_role: False when the chat template rejects a system turn (it is folded into
        the user turn instead).
    template_kwargs: extra variables for ``apply_chat_template`` (e.g. Qwen3's
        ``enable_thinking``).
    load_kwargs: extra ``from_pretrained`` arguments (e.g. an attention implementation).
    fused_targets: logical target -> (physical layer, ``slice_fn``) for models whose attention
        uses one fused projection, e.g. GPT-2's ``c_attn`` (q|k|v): ``{"q_proj": ("c_attn",
        lambda cfg: slice(0, cfg.n_embd))}``. ``slice_fn(text_config)`` gives the output columns
        of the physical layer that the logical target owns; its LoRA delta is added there only.
    Subclass and override ``load_model`` / ``load_tokenizer`` for models that need more.
    """

    name: str
    model_types: tuple[str, ...]
    system_role: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    fused_targets: dict[str, tuple[str, Callable[[Any], slice]]] = field(default_factory=dict)

    def load_model(self, source: str, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, **{**self.load_kwargs, **kwargs}
        )

    def load_tokenizer(self, source: str, trust_remote_code: bool = False, **kwargs):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        if tokenizer.pad_token is None:  # batching needs a pad id; eos is the usual stand-in
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def format_prompt(self, tokenizer, user: str, system: str = "", chat_template: bool = True) -> str:
        """Prompt text for one user turn, ending where the assistant's answer starts."""
        if not (chat_template and getattr(tokenizer, "chat_template", None)):
            head = f"{system}\n\n" if system else ""
            return f"{head}User: {user}\nAssistant:"
        messages = []
        if system and self.system_role:
            messages.append({"role": "system", "content": system})
        elif system:
            user = f"{system}\n\n{user}"
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )


LLAMA = ModelFamily("llama", ("llama",))  # Llama 2/3.x and SmolLM2
# Mistral-7B-Instruct-v0.2's template rejects a system turn.
MISTRAL = ModelFamily("mistral", ("mistral",), system_role=False)
GEMMA = ModelFamily("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"), system_role=False,
                    load_kwargs={"attn_implementation": "eager"})  # gemma2 soft-capping wants eager
QWEN = ModelFamily("qwen", ("qwen2", "qwen3"), template_kwargs={"enable_thinking": False})

BUILTIN_FAMILIES: list[ModelFamily] = [LLAMA, MISTRAL, GEMMA, QWEN]


def _by_name(families: Mapping[str, ModelFamily] | None) -> dict[str, ModelFamily]:
    # The assembly layer passes the registered families; a caller without it gets the built-ins.
    return dict(families) if families is not None else {f.name: f for f in BUILTIN_FAMILIES}


def find_family(model_type: str, families: Mapping[str, ModelFamily] | None = None) -> ModelFamily:
    """The family (of ``families``: name -> family, default the built-ins) whose ``model_types``
    include ``model_type``."""
    families = _by_name(families)
    for family in families.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in families.values() for t in f.model_types)
    raise T2LError(
        f"base_model: no model family covers model_type '{model_type}'; known model types: "
        f"{', '.join(known)}. Set base_model.family explicitly or install a family plugin."
    )


def get_family(name: str, model_type: str, families: Mapping[str, ModelFamily] | None = None) -> ModelFamily:
    """``base_model.family``: 'auto' detects from ``model_type``, else a name of ``families``."""
    if name == "auto":
        return find_family(model_type, families)
    families = _by_name(families)
    if name not in families:
        raise T2LError(
            f"base_model.family: unknown model family '{name}'{did_you_mean(name, families)}; "
            f"expected 'auto' or one of: {', '.join(sorted(families))}"
        )
    return families[name]
