"""Evaluation protocols: whose prompts, answer length and scoring rules a number follows.

- ``paper``: the T2L reference evaluation (SakanaAI/text-to-lora@8ba77493, ``vllm_eval.py``,
  ``utils/eval_tasks.py``): its prompt templates, an empty system turn in the reference's chat
  templates, greedy answers of up to 512 tokens, and its matching rules (an answer counts when it
  starts with the right letter/number; BoolQ by loose yes/no matching). Numbers go next to the
  paper's table.
- ``lm-eval``: lm-evaluation-harness 0.4.x's standard zero-shot task formats (cloze prompts,
  no chat template, option text after a " " target delimiter, WinoGrande's partial scoring) with
  acc and acc_norm exactly as the harness computes them. Numbers go next to the harness's.
- ``chat``: this project's earlier protocol: T2L's ``metadata.yaml`` prompt templates in the
  model's chat format, scored by the log-likelihood of the option label (``--scoring`` and
  ``--mc-answer`` choose variants).

A benchmark defines each protocol it supports (``Benchmark.protocols``); under a protocol it
does not define, it is scored under ``chat`` and the results say so.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

PAPER, LM_EVAL, CHAT = "paper", "lm-eval", "chat"
PROTOCOLS = (PAPER, LM_EVAL, CHAT)
DEFAULT_PROTOCOL = PAPER
PAPER_MAX_NEW_TOKENS = 512  # the reference's vLLM SamplingParams(max_tokens=2**9), temperature 0

PROTOCOL_HELP = (
    "paper (default): the T2L reference's prompts, greedy answers up to 512 tokens and matching rules, so "
    "numbers sit next to the paper's table; lm-eval: lm-evaluation-harness 0.4's cloze formats with acc and "
    "acc_norm for the seven multiple-choice benchmarks; chat: T2L's metadata templates in the chat format, "
    "option-label log-likelihood (--scoring/--mc-answer apply only here). The default is paper because "
    "t2l eval exists to reproduce the paper's comparison; use lm-eval for small models, whose signal only "
    "cloze scoring shows"
)

def with_description(description: str, text: str) -> str:
    """The base+description condition's user turn (or lm-eval context): the description first, a
    blank line, then the prompt, as the reference does. Every protocol and the end-of-training
    table build it here."""
    return f"{description}\n\n{text}"


# The reference evaluates with its own chat templates for the three paper models
# (chat_templates/<model>/chat_template.jinja, vendored verbatim next to this module).
_REFERENCE_TEMPLATES = {
    "mistral-7b-instruct-v0.2": "mistral-7b-instruct-v0.2.jinja",
    "llama-3.1-8b-instruct": "llama-3.1-8b-instruct.jinja",
    "gemma-2-2b-it": "gemma-2-2b-it.jinja",
}


@lru_cache(maxsize=None)
def _template_text(file: str) -> str:
    return resources.files("t2l_framework.eval").joinpath("reference_chat_templates", file).read_text("utf-8")


def reference_chat_template(model_name: str) -> str | None:
    """The reference's own chat template for a paper model (matched by name), else None."""
    low = model_name.lower().rstrip("/")
    for key, file in _REFERENCE_TEMPLATES.items():
        if low.endswith(key):
            return _template_text(file)
    return None


def paper_chat_text(runtime, user: str, system: str) -> str:
    """Chat text the reference builds: messages [system, user] with the generation prompt.

    The reference always sends a system turn (empty). With its own templates for Mistral, Llama 3.1
    and Gemma 2 that is exact; another model gets its tokenizer's template, the system turn
    folded into the user turn as ``system + "\\n\\n" + user`` where the template rejects it
    (which is what the reference's Mistral and Gemma templates do).
    """
    tok, family = runtime.tokenizer, runtime.base.family
    template = reference_chat_template(runtime.base_model_name)
    if template is None and not (runtime.chat_template and getattr(tok, "chat_template", None)):
        return runtime.format(f"{system}\n\n{user}" if system else user)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if template is None and not family.system_role:
        messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True,
                                   **family.template_kwargs)


def adds_special_tokens(protocol: str) -> bool:
    """Whether prompts are tokenized with the tokenizer's special tokens (BOS for Llama/Mistral).

    vLLM (the reference) and lm-evaluation-harness's HF model both encode the prompt text with
    the tokenizer's defaults; with a chat template that already starts with BOS, vLLM's prompt
    starts with two, and ``paper`` keeps that. ``chat`` adds none (the template has them).
    """
    return protocol in (PAPER, LM_EVAL)
