"""Answer extraction and per-item scores for the evaluation benchmarks.

- multiple choice by log-likelihood (``select_option``) or by generation (``extract_choice``);
- the T2L reference's matching rules (``reference_choice``, ``reference_bool``,
  ``reference_number``) and lm-evaluation-harness's acc / acc_norm (``ClozeAccuracy``);
- GSM8K final numbers (``gsm8k_gold``, ``extract_final_number``, ``numbers_equal``);
- HumanEval / MBPP: the program to run (``extract_code``, ``humaneval_program``, ``mbpp_program``);
  running it is ``eval.sandbox``'s job;
- SNI: best ROUGE-L F1 over the references (``text_metrics.rouge_l``).

The metrics are torchmetrics ``Metric``s keeping one float per item, so per-item scores (for
standard errors and the result cache) and means survive a multi-process sync.
"""

from __future__ import annotations

import ast
import math
import re
import textwrap
from decimal import Decimal
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torchmetrics
from torchmetrics.utilities import dim_zero_cat

from t2l_framework.eval.text_metrics import normalize as normalize_text
from t2l_framework.eval.text_metrics import rouge_l

# --- multiple choice by log-likelihood --------------------------------------------------------


def select_option(logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> int:
    """Index of the most likely option; with ``lengths``, by log-likelihood per byte.

    ``lengths`` are the byte lengths of the options' continuation texts, as lm-evaluation-harness's
    acc_norm uses (so longer options aren't penalised for having more tokens). Equal scores go to
    the lowest index, like ``numpy.argmax``; NaN never wins (all NaN -> 0).
    """
    if len(logprobs) == 0:
        raise ValueError("select_option: no options")
    if lengths is not None:
        if len(lengths) != len(logprobs):
            raise ValueError(f"select_option: {len(logprobs)} logprobs but {len(lengths)} lengths")
        if any(n <= 0 for n in lengths):
            raise ValueError(f"select_option: option lengths must be positive, got {list(lengths)}")
        scores = [float(lp) / n for lp, n in zip(logprobs, lengths)]
    else:
        scores = [float(lp) for lp in logprobs]
    best = 0
    for i, s in enumerate(scores):
        if not math.isnan(s) and (math.isnan(scores[best]) or s > scores[best]):
            best = i
    return best


# --- multiple choice by generation ------------------------------------------------------------

_OPEN = "\"'`*_([{ \t\r\n"  # decoration before a label: "(B)", "**B**", "`true`"
_CLOSE = "\"'`*_)]}.,;:!? \t\r\n"  # decoration / punctuation after it
# A leading "Answer:", "The correct answer is", "Option", "Choice" before the label.
_LEAD = re.compile(r"^\W*(?:the\s+)?(?:(?:correct|right|best|final)\s+)?(?:answer|option|choice|ending)\b"
                   r"\s*(?:is\b|:|-)?\s*", re.IGNORECASE)
# "answer is X", "answer: X", "correct option is X", anywhere in the text.
_PHRASE = re.compile(r"\b(?:answer|option|choice|ending)\s*(?:is|:|=)\s*", re.IGNORECASE)
_BOOL_ALIASES = {"true": "yes", "false": "no"}


def _label_aliases(labels: Sequence[str]) -> list[list[str]]:
    """Lower-cased words that name each label: the label, plus yes/no when labels are true/false."""
    low = [str(lab).strip().lower() for lab in labels]
    boolean = sorted(low) == ["false", "true"]
    return [[lab, _BOOL_ALIASES[lab]] if boolean else [lab] for lab in low]


def _label_at_start(text: str, labels: Sequence[str], aliases: list[list[str]], loose: bool = False) -> int | None:
    """The label that ``text`` starts with, followed by punctuation, a bracket or the end.

    Single-character labels ("A", "1") need such a delimiter, so "A cat ..." is not label A and
    "10" is not label 1; word labels ("true") only need a word boundary ("True because ...").
    ``loose`` (after "answer is"): a label written in its own case may also be followed by a
    space ("the answer is C because ..."; "the answer is a cat" stays no label).
    """
    raw = text.lstrip(_OPEN)
    head = raw.lower()
    for i, names in enumerate(aliases):
        for name in names:
            if not name or not head.startswith(name):
                continue
            rest = head[len(name):]
            if not rest or rest[0] in _CLOSE.strip() or re.match(r"[ \t]*(?:$|\r|\n|[-\u2013\u2014]\s)", rest):
                return i
            if len(name) > 1 and name[-1].isalnum() and not rest[0].isalnum() and rest[0] != "_":
                return i
            if loose and rest[0].isspace() and raw.startswith(str(labels[i]).strip()):
                return i
    return None


def extract_choice(text: str, labels: Sequence[str], texts: Sequence[str] | None = None) -> int | None:
    """Index of the option a generated answer names, or None.

    Rules, first hit wins (labels are matched case-insensitively; with labels exactly
    true/false, "yes"/"no" count as true/false):

    1. the whole answer is a label, ignoring decoration and end punctuation: "B", "**B**", "(B).";
       a leading "Answer:" / "The correct answer is" / "Option" is skipped first ("Option 2");
    2. the answer starts with a label followed by punctuation, a closing bracket or a colon:
       "B. ...", "(B) ...", " b) ...", "B: ..." (but "A cat ..." is not label A);
    3. the last "answer is X" / "answer: X" / "option is X" phrase anywhere, X as in rule 2 or,
       written in the label's own case, followed by a space ("the answer is C because ...");
    4. an option's text inside the answer (normalised, whole words): options whose text is part
       of a longer matching option's text are dropped (the longest wins), and only a single
       remaining option counts.
    """
    aliases = _label_aliases(labels)
    stripped = text.strip()
    heads = [stripped, _LEAD.sub("", stripped, count=1)]
    for head in heads:  # rule 1
        core = head.strip(_OPEN + _CLOSE).lower()
        for i, names in enumerate(aliases):
            if core and core in names:
                return i
    for head in heads:  # rule 2
        found = _label_at_start(head, labels, aliases)
        if found is not None:
            return found
    for m in reversed(list(_PHRASE.finditer(stripped))):  # rule 3
        found = _label_at_start(stripped[m.end():], labels, aliases, loose=True)
        if found is not None:
            return found
    if texts:  # rule 4
        answer = f" {normalize_text(text)} "
        options = [normalize_text(t) for t in texts]
        hits = [i for i, o in enumerate(options) if o and f" {o} " in answer]
        hits = [i for i in hits
                if not any(options[i] != options[j] and f" {options[i]} " in f" {options[j]} " for j in hits)]
        if len(hits) == 1:
            return hits[0]
    return None


# --- the T2L reference's matching rules (protocol "paper") ------------------------------------
# Restated from SakanaAI/text-to-lora@8ba77493 src/hyper_llm_modulator/utils/eval_tasks.py and
# src/fishfarm/fishfarm/tasks/language_restricted_math.py, quirks included, so that numbers
# under ``--protocol paper`` mean what the paper's mean.

_REFERENCE_STRIP = ":`'\"(.) "
_REFERENCE_CHOICES = tuple("abcdefghijklmnopqrstuvwxyz") + tuple("0123456789") + ("10",)
# Looked for in this order, as substrings (so "not sure" reads as "no", "invalid" as "valid").
_REFERENCE_BOOLS = (("1", True), ("0", False), ("yes", True), ("no", False), ("true", True), ("false", False),
                    ("positive", True), ("negative", False), ("valid", True), ("invalid", False))


def reference_choice(text: str) -> str | None:
    """The reference's ``get_choice``: strip ``:`'"(.) `` and spaces from both ends, lower-case,
    and return the first of a..z, 0..9 the text starts with ("Answer: B" -> "a"), else None."""
    low = str(text).strip().strip(_REFERENCE_STRIP).lower()
    return next((c for c in _REFERENCE_CHOICES if low.startswith(c)), None)


def reference_choice_correct(generated: str, target: str) -> bool:
    """The reference's ``get_choice_accuracy``: same first choice character (None == None counts)."""
    return reference_choice(generated) == reference_choice(target)


def reference_bool(text: str) -> bool | None:
    """The reference's ``get_bool_value_from_text``: the first of 1/0/yes/no/true/false/positive/
    negative/valid/invalid found anywhere in the text (case-insensitive), else None."""
    text = str(text)
    low = text.lower()
    return next((value for word, value in _REFERENCE_BOOLS if word in (text if word.isdigit() else low)), None)


def reference_bool_correct(generated: str, target: str) -> bool:
    """The reference's ``get_binary_accuracy_flex``: both have a boolean value and they agree."""
    got, want = reference_bool(generated), reference_bool(target)
    return got is not None and want is not None and got == want


def reference_number(text: str) -> float | None:
    """fishfarm's ``extract_answer_number``: the last ``\\d*\\.?\\d+`` as a float (no sign, no
    thousands separators: "1,234" -> 234.0), else None. Used for the answer and the gold field."""
    matches = re.findall(r"\d*\.?\d+", str(text))
    return float(matches[-1].replace(",", "")) if matches else None


# --- GSM8K ------------------------------------------------------------------------------------

# "1,234", "-5", "$18.00", "3/4", "12%"; not the "5" of "x5" or "1.5"; "18." ending a sentence -> "18".
_NUMBER_RE = r"(?<![\w.])-?\$?-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?![\d,]))?%?"
_NUMBER = re.compile(_NUMBER_RE)
# "The answer is 8", "Final answer: **$1,234**": the number right after the phrase, so that
# "Answer: she has 3 apples, 3 + 5 = 8" falls through to the last-number rule.
_ANSWER_NUMBER = re.compile(r"answer\s*(?:is|was|:|=)[\s:=*_`(\[]*(" + _NUMBER_RE + ")", re.IGNORECASE)


def _to_fraction(text: str) -> Fraction | None:
    s = text.strip().replace(",", "").replace("$", "").replace("%", "").replace(" ", "")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def canonical_number(text: str) -> str | None:
    """"1,234" -> "1234", "$18.00" -> "18", "0.50" -> "0.5", "3/4" -> "0.75" (fractions with a
    non-terminating decimal stay "p/q"); None when ``text`` is not a number."""
    value = _to_fraction(text)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def gsm8k_gold(answer_field: str) -> str:
    """The number after "####" in a GSM8K answer field, canonical ("#### 1,234" -> "1234")."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####': {answer_field[-80:]!r}")
    found = _first_number(answer_field.rsplit("####", 1)[1])
    if found is None:
        raise ValueError(f"GSM8K answer has no number after '####': {answer_field[-80:]!r}")
    return found


def _first_number(text: str) -> str | None:
    for m in _NUMBER.finditer(text):
        value = canonical_number(m.group())
        if value is not None:
            return value
    return None


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), LaTeX simplified."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            content = text[i:j]
            break
    else:
        content = text[i:]
    content = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", content)
    content = content.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\$", "$")
    return content.rsplit("=", 1)[-1]  # "x = 5", "2 \times 3 = 6"


def extract_final_number(text: str) -> str | None:
    """The model's final answer as a canonical number, or None.

    Priority: (1) the first number after the last "####"; (2) the last ``\\boxed{...}``;
    (3) the number right after the last "answer is" / "answer:" phrase ("The answer is 12.
    Check: 12 * 2 = 24" -> 12); (4) the last number in the text.
    """
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    boxed = _boxed(text)
    if boxed is not None:
        found = _first_number(boxed)
        if found is not None:
            return found
    for m in reversed(list(_ANSWER_NUMBER.finditer(text))):
        found = canonical_number(m.group(1))
        if found is not None:
            return found
    numbers = [canonical_number(m.group()) for m in _NUMBER.finditer(text)]
    numbers = [n for n in numbers if n is not None]
    return numbers[-1] if numbers else None


def numbers_equal(a: str | None, b: str | None, rel_tol: float = 1e-6) -> bool:
    """Same number ("18.00" == "18", "0.75" == "3/4"), within ``rel_tol`` for decimals; None never
    equals anything. Strings that are not numbers compare as text."""
    if a is None or b is None:
        return False
    x, y = _to_fraction(a), _to_fraction(b)
    if x is None or y is None:
        return a.strip() == b.strip()
    return x == y or abs(x - y) <= rel_tol * max(abs(x), abs(y))


# --- code -------------------------------------------------------------------------------------

_FENCE_OPEN = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n", re.IGNORECASE)


def _parses(code: str) -> bool:
    """Valid Python, as a module or as a function body (HumanEval completions may be a body)."""
    for candidate in (code, "def _f():\n" + textwrap.indent(textwrap.dedent(code), "    ")):
        try:
            ast.parse(candidate)
            return True
        except SyntaxError:
            pass
    return False


def extract_code(completion: str) -> str:
    """The code the model wrote after the prompt's "```python\\n" prefill.

    Cut at the first closing fence; if the model opened a new fence first (```python, or a bare
    ``` at the start), take that block instead. Without a closing fence the model may go on in
    prose: when the code does not parse, drop trailing lines from the last unindented line that
    leaves a parsable prefix (prose is never indented; code that never parses is kept as is).
    """
    text = completion
    first = text.find("```")
    if first >= 0:
        opened = _FENCE_OPEN.match(text, first)
        is_opening = opened and (opened.group().strip() != "```" or not text[:first].strip())
        if is_opening:
            text = text[opened.end():]
            end = text.find("```")
            text = text if end < 0 else text[:end]
        else:
            text = text[:first]
    text = text.rstrip()
    if _parses(text):
        return text + "\n" if text else ""
    lines = text.split("\n")
    for k in range(len(lines) - 1, 0, -1):
        if lines[k].strip() and not lines[k][0].isspace():
            prefix = "\n".join(lines[:k]).rstrip()
            if prefix.strip() and _parses(prefix):
                return prefix + "\n"
    return text + "\n"


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _prompt_context(prompt: str, entry_point: str) -> str:
    """The prompt without the entry point's def: imports, helper functions, constants."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return "\n".join(line for line in prompt.splitlines() if re.match(r"(?:import|from)\s", line))
    lines = prompt.splitlines()
    parts = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        parts.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n\n".join(parts)


def humaneval_program(prompt: str, completion_code: str, test: str, entry_point: str) -> str:
    """The program that tests one HumanEval sample (pass = exit status 0).

    If the code defines ``def <entry_point>(`` at top level, the model rewrote the whole
    function: keep the prompt's other top-level statements (imports, helper functions such as
    HumanEval/10's ``is_palindrome``, constants) and put the code after them. Otherwise the code
    is the function body: append it to the prompt, indented by 4 spaces when its first line is
    not indented.
    """
    code = completion_code.rstrip("\n")
    if _defines(code, entry_point):
        head = _prompt_context(prompt, entry_point)
        body = (head + "\n\n\n" if head.strip() else "") + code
    else:
        first = next((line for line in code.splitlines() if line.strip()), "")
        if first and not first[0].isspace():
            code = textwrap.indent(code, "    ")
        body = prompt + ("" if prompt.endswith("\n") else "\n") + code
    return f"{body}\n\n\n{test.strip(chr(10))}\n\n\ncheck({entry_point})\n"


def mbpp_program(code: str, test_imports: Sequence[str], tests: Sequence[str]) -> str:
    """The program that tests one MBPP sample: the test imports, the code, then the assertions."""
    parts = ["\n".join(test_imports), code.strip("\n"), "\n".join(tests)]
    return "\n\n\n".join(p for p in parts if p.strip()) + "\n"


# --- metrics ----------------------------------------------------------------------------------


def _check_lengths(**named: Sequence) -> None:
    sizes = {name: len(v) for name, v in named.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError("length mismatch: " + ", ".join(f"{k} has {n}" for k, n in sizes.items()))


class ItemScores(torchmetrics.Metric):
    """One float per item (a "cat" list state, so every process's items are gathered);
    ``compute()`` is the mean (nan for no items), ``scores()`` every item."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _add(self, values: Sequence[float]) -> None:
        self.values.append(torch.tensor([float(v) for v in values], dtype=self.dtype, device=self.device))

    def _all(self) -> torch.Tensor:
        if isinstance(self.values, torch.Tensor):
            return self.values
        return dim_zero_cat(self.values) if self.values else torch.zeros(0, dtype=self.dtype, device=self.device)

    def compute(self) -> torch.Tensor:
        values = self._all().double()
        return values.mean() if values.numel() else torch.tensor(float("nan"), dtype=torch.float64)

    def scores(self) -> list[float]:
        """Every item's score, gathered over processes like ``compute()``."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            return self._all().tolist()


class MultipleChoiceAccuracy(ItemScores):
    """1 when the most likely option (per byte, with ``normalize``: acc_norm) is the gold one."""

    choose = staticmethod(select_option)  # option index from log-likelihoods (and lengths)

    def __init__(self, normalize: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize

    def update(self, option_logprobs: Sequence[Sequence[float]], gold: Sequence[int],
               option_lengths: Sequence[Sequence[int]] | None = None) -> None:
        """``option_lengths`` (byte lengths) are required with ``normalize`` and unused without."""
        _check_lengths(option_logprobs=option_logprobs, gold=gold, option_lengths=option_lengths)
        if self.normalize and option_lengths is None:
            raise ValueError(f"{type(self).__name__}(normalize=True) needs option_lengths")
        lengths = option_lengths if self.normalize else [None] * len(gold)
        self._add([self.choose(lp, n) == g for lp, n, g in zip(option_logprobs, lengths, gold)])


class ChoiceExtractionAccuracy(ItemScores):
    """1 when the option named by the generated answer (``extract_choice``) is the gold one."""

    def update(self, texts: Sequence[str], labels: Sequence[Sequence[str]], gold: Sequence[int],
               option_texts: Sequence[Sequence[str]] | None = None) -> None:
        _check_lengths(texts=texts, labels=labels, gold=gold, option_texts=option_texts)
        options = option_texts if option_texts is not None else [None] * len(texts)
        self._add([extract_choice(t, lab, o) == g for t, lab, o, g in zip(texts, labels, options, gold)])


class FinalNumberAccuracy(ItemScores):
    """1 when the generated final number (``extract_final_number``) equals the gold number."""

    def update(self, texts: Sequence[str], gold: Sequence[str]) -> None:
        _check_lengths(texts=texts, gold=gold)
        self._add([numbers_equal(extract_final_number(t), canonical_number(str(g)) or str(g))
                   for t, g in zip(texts, gold)])


class PassAtOne(ItemScores):
    """1 when the sample's program passed its tests (one sample per problem)."""

    def update(self, passed: Sequence[bool]) -> None:
        self._add([bool(p) for p in passed])


class RougeL(ItemScores):
    """Best ROUGE-L F1 over each item's references (a single string counts as one reference)."""

    def update(self, texts: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        _check_lengths(texts=texts, references=references)
        self._add([rouge_l(t, [refs] if isinstance(refs, str) else list(refs)) for t, refs in zip(texts, references)])


class ClozeAccuracy(MultipleChoiceAccuracy):
    """lm-evaluation-harness's ``acc`` (argmax of the options' log-likelihoods) or, with
    ``normalize``, its ``acc_norm`` (argmax of log-likelihood / the option's length in characters).

    Both use ``numpy.argmax`` as the harness does (ties and NaN go to the first such option).
    """

    @staticmethod
    def choose(option_logprobs: Sequence[float], lengths: Sequence[int] | None = None) -> int:
        lls = np.asarray(option_logprobs, dtype=np.float64)
        if lengths is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                lls = lls / np.asarray(lengths, dtype=np.float64)
        return int(np.argmax(lls))


class ReferenceChoiceAccuracy(ItemScores):
    """Protocol ``paper``: 1 when the answer starts with the target's choice (``reference_choice``)."""

    def update(self, texts: Sequence[str], targets: Sequence[str]) -> None:
        _check_lengths(texts=texts, targets=targets)
        self._add([reference_choice_correct(t, g) for t, g in zip(texts, targets)])


class ReferenceBoolAccuracy(ItemScores):
    """Protocol ``paper`` (BoolQ): 1 when the answer's loose boolean equals the target's."""

    def update(self, texts: Sequence[str], targets: Sequence[str]) -> None:
        _check_lengths(texts=texts, targets=targets)
        self._add([reference_bool_correct(t, g) for t, g in zip(texts, targets)])


class ReferenceNumberAccuracy(ItemScores):
    """Protocol ``paper`` (GSM8K): 1 when the answer's last number equals the gold integer."""

    def update(self, texts: Sequence[str], gold: Sequence[int | None]) -> None:
        _check_lengths(texts=texts, gold=gold)
        self._add([g is not None and reference_number(t) == g for t, g in zip(texts, gold)])
