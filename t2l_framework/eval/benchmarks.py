"""Evaluation benchmarks: examples, prompts and task descriptions read from the vendored data.

A ``Benchmark`` turns its data files into ``Example``s (the user turn, plus what scoring needs)
and names the task descriptions a hypernetwork gets. Built-ins follow T2L: the prompt templates
and the 200 generated descriptions of each benchmark come from ``data/t2l/tasks/<name>/metadata.yaml``.
Plugins register more through ``t2l_register_benchmarks`` (``register(name, BenchmarkSubclass)``).

Scoring kinds: ``multiple_choice`` (log-likelihood of each option, or generation + answer
extraction), ``final_number`` (GSM8K), ``code`` (pass@1 in the sandbox), ``rouge`` (SNI).

A benchmark owns its prompts and grading per evaluation protocol (``eval.protocols``):
``build_examples(protocol)`` makes the protocol's examples, ``scoring``/``grade``/``program``
say how answers are scored. The built-in ten define ``paper``; the seven multiple-choice ones
also ``lm-eval`` (each format noted with its source version below).
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import yaml

from t2l_framework.config import project_root
from t2l_framework.data.files import read_bytes, read_text, text_lines
from t2l_framework.errors import T2LError
from t2l_framework.eval.protocols import CHAT, LM_EVAL, PAPER, PAPER_MAX_NEW_TOKENS



@dataclass
class GradeContext:
    """What grading may need from the harness: the sandbox's time limit per program, and a
    ``progress(done)`` callback for long grading (running programs)."""

    code_timeout_s: float = 10.0
    progress: Callable[[int], None] | None = None


@dataclass
class Graded:
    """Per-item scores (0..1) under the benchmark's ``metric``, plus optional per-item details
    (e.g. ``{"status": [...]}`` of sandboxed programs) that go into predictions.jsonl."""

    scores: list[float]
    details: dict[str, list] = field(default_factory=dict)


@dataclass
class Example:
    """One evaluation item.

    prompt: the user turn. task: whose descriptions apply (the benchmark, or an SNI task id).
    labels / options: multiple choice: what the model answers (``"B"``) and the option texts.
    gold: MC: index of the right option; final_number: the number; rouge: reference answers.
    tests: code: what the sandbox runs (see ``eval.scoring``).
    target: ``paper``: the reference's answer text the matching rules compare with ("B", "True").
    system: ``paper``: the system turn the reference sends (empty); None: no system turn.
    prefill: overrides the benchmark's prefill (``paper`` HumanEval starts the answer with the prompt).
    cloze: ``lm-eval``: (context, continuation) per option, raw text without a chat format; the
        context differs per option for WinoGrande's partial scoring.
    norm_lengths: ``lm-eval``: acc_norm's denominator per option (characters of the choice), or
        None where the harness defines acc only.
    description: the description this item is asked with (a run's held-out items each carry
        one); None: the benchmark's descriptions of its task, ``n_descriptions`` of them averaged.
    """

    id: str
    prompt: str
    task: str
    gold: Any
    labels: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    tests: dict = field(default_factory=dict)
    target: str = ""
    system: str | None = None
    prefill: str | None = None
    cloze: list[tuple[str, str]] = field(default_factory=list)
    norm_lengths: list[int] | None = None
    description: str | None = None


class Benchmark(ABC):
    """Base class: set the class attributes, implement ``load_examples`` and ``descriptions``.

    A benchmark grades itself: ``grade`` turns generated answers into per-item scores under
    ``metric`` (any name: the harness reports whatever the benchmark names). The built-in
    ``kind`` values pick a built-in scorer; a benchmark with another kind overrides ``grade``.
    ``version`` goes into the result-cache key: bump it when prompts or scoring change.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "multiple_choice"
    metric: ClassVar[str] = "acc"
    version: ClassVar[str] = "1"
    max_new_tokens: ClassVar[int] = 16  # generated answers (generation scoring, GSM8K, code)
    stop: ClassVar[tuple[str, ...]] = ()  # texts that end a generated answer early (besides EOS)
    files: ClassVar[tuple[str, ...]] = ()  # data files, relative to the data root
    protocols: ClassVar[tuple[str, ...]] = (CHAT,)  # protocols this benchmark defines (others: scored as chat)
    paper_match: ClassVar[str] = "choice"  # multiple choice under paper: "choice" (first letter) or "bool"
    runs_programs: ClassVar[bool] = False  # grading runs code in the sandbox (its time limit is in the cache key)
    system_prompt: ClassVar[str] = ""  # chat: the system turn of every prompt (a run's data.system_prompt)
    max_prompt_tokens: ClassVar[int] = 0  # prompt tokens kept, cut from the left (0: the model's context)

    def __init__(self, data_root: str | Path | None = None):
        self.data_root = Path(data_root) if data_root else project_root() / "data"

    # --- what subclasses provide -------------------------------------------------------------

    @abstractmethod
    def load_examples(self) -> list[Example]:
        """Every example of the benchmark, in a fixed order (``--limit`` takes the first ones)."""

    @abstractmethod
    def descriptions(self, task: str) -> list[str]:
        """Task descriptions for the hypernetwork (and the base+description prompt)."""

    @property
    def prefill(self) -> str:
        """Text the assistant's answer starts with (part of the prompt, e.g. "```python\\n")."""
        return ""

    def build_examples(self, protocol: str) -> list[Example]:
        """Examples as ``protocol`` defines them (one of ``self.protocols``); the base knows chat."""
        return self.load_examples()

    # --- shared --------------------------------------------------------------------------------

    def protocol(self, requested: str) -> str:
        """The protocol this benchmark is scored under when ``requested`` is asked for."""
        return requested if requested in self.protocols else CHAT

    def examples(self, limit: int = 0, protocol: str = CHAT) -> list[Example]:
        """The first ``limit`` examples (all for 0) under ``protocol``, in a fixed order."""
        protocol = self.protocol(protocol)
        if protocol not in self._built:
            self._built[protocol] = self.build_examples(protocol)
        items = self._built[protocol]
        return items[:limit] if limit > 0 else list(items)

    @cached_property
    def _built(self) -> dict[str, list[Example]]:
        return {}

    def scoring(self, protocol: str, generate: bool = False) -> str:
        """How answers are scored: 'cloze' (lm-eval log-likelihoods), 'loglik' (option labels
        after the chat prompt) or 'generate' (greedy answers, graded by ``grade`` / ``program``)."""
        protocol = self.protocol(protocol)
        if self.kind != "multiple_choice" or protocol == PAPER or (protocol == CHAT and generate):
            return "generate"
        return "cloze" if protocol == LM_EVAL else "loglik"

    def answer_length(self, protocol: str) -> int:
        """Most new tokens of a generated answer under ``protocol``."""
        return PAPER_MAX_NEW_TOKENS if self.protocol(protocol) == PAPER else self.max_new_tokens

    def stop_texts(self, protocol: str) -> tuple[str, ...]:
        """Texts that end a generated answer early under ``protocol`` (besides EOS)."""
        return self.stop

    def grade(self, examples: list[Example], answers: list[str], protocol: str,
              context: GradeContext | None = None) -> list[float] | Graded:
        """Per-item scores of generated answers, by the built-in scorer of ``kind``."""
        from t2l_framework.eval import scoring

        paper = self.protocol(protocol) == PAPER
        if self.kind == "multiple_choice" and paper:
            metric = scoring.ReferenceBoolAccuracy() if self.paper_match == "bool" else scoring.ReferenceChoiceAccuracy()
            metric.update(answers, [ex.target for ex in examples])
        elif self.kind == "multiple_choice":
            metric = scoring.ChoiceExtractionAccuracy()
            metric.update(answers, [ex.labels for ex in examples], [ex.gold for ex in examples],
                          [ex.options for ex in examples])
        elif self.kind == "final_number" and paper:
            metric = scoring.ReferenceNumberAccuracy()
            metric.update(answers, [ex.gold for ex in examples])
        elif self.kind == "final_number":
            metric = scoring.FinalNumberAccuracy()
            metric.update(answers, [ex.gold for ex in examples])
        elif self.kind == "rouge":
            metric = scoring.RougeL()
            metric.update(answers, [ex.gold for ex in examples])
        else:
            raise T2LError(f"benchmark '{self.name}': kind '{self.kind}' has no built-in scorer; override grade() "
                           "to score its answers")
        return metric.scores()

    def program(self, example: Example, answer: str, protocol: str) -> str:
        """Code benchmarks: the program that tests ``answer`` (pass = exit status 0)."""
        raise T2LError(f"benchmark '{self.name}' of kind {self.kind} has no programs to run")

    def path(self, relative: str) -> Path:
        p = self.data_root / relative
        if not p.is_file():
            raise T2LError(f"benchmark '{self.name}': data file {p} is missing (the vendored data/ folder "
                           "should hold it; see data/README.md)")
        return p

    def fingerprint(self) -> str:
        """Identity of the benchmark's data and prompts, for the result cache."""
        h = hashlib.sha256(f"{type(self).__qualname__}:{self.name}:{self.version}".encode())
        for rel in self.files:
            h.update(read_bytes(self.path(rel)))  # the content: the same key for a .gz or a plain copy
        return h.hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    """One object per non-blank line of a JSONL file (plain or ``.jsonl.gz``)."""
    rows = []
    for lineno, line in text_lines(path):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise T2LError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


_CHOICE_LINE = re.compile(r"^\{choices\[label\]\[0\]\}(?P<sep>.*?)\{choices\[text\]\[0\]\}$", re.M)
_OTHER_CHOICE_LINES = re.compile(r"^\{choices\[label\]\[[1-9]\]\}.*?\{choices\[text\]\[[1-9]\]\}\n?", re.M)


class T2LMetadataBenchmark(Benchmark):
    """A benchmark whose prompt template and descriptions are T2L's ``metadata.yaml``."""

    metadata_task: ClassVar[str] = ""  # folder under data/t2l/tasks (default: name)

    @cached_property
    def metadata(self) -> dict:
        task = self.metadata_task or self.name
        path = self.path(f"t2l/tasks/{task}/metadata.yaml")
        meta = yaml.safe_load(read_text(path))
        for key in ("descriptions", "user_prompt_template"):
            if not meta.get(key):
                raise T2LError(f"{path}: missing '{key}'")
        return meta

    def descriptions(self, task: str) -> list[str]:
        return list(self.metadata["descriptions"])

    def load_examples(self) -> list[Example]:
        """Subclasses define ``build_examples`` per protocol; the plain examples are chat's."""
        return self.build_examples(CHAT)

    @property
    def prefill(self) -> str:
        return self.metadata.get("assistant_prefill") or ""

    def render(self, row: dict) -> str:
        """Fill the template from a data row (HF field names, as T2L's templates expect).

        Templates that list four ``{choices[label][i]}: {choices[text][i]}`` lines get one line
        per option the row really has (some ARC questions have 3 or 5 options).
        """
        template = self.metadata["user_prompt_template"]
        match = _CHOICE_LINE.search(template)
        if match and "choices" in row:
            lines = "\n".join(f"{label}{match['sep']}{text}"
                              for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
            template = _OTHER_CHOICE_LINES.sub("", template)
            template = _CHOICE_LINE.sub(lambda _: lines.replace("{", "{{").replace("}", "}}"), template)
        try:
            return template.format(**row)
        except (KeyError, IndexError) as exc:
            raise T2LError(f"benchmark '{self.name}': prompt template needs {exc} which the data row lacks") from None


# --- formats of the other protocols ----------------------------------------------------------
# paper: the T2L reference's templates, verbatim from SakanaAI/text-to-lora@8ba77493
# src/hyper_llm_modulator/vllm_eval.py (they differ slightly from metadata.yaml's, which the
# reference uses for training). lm-eval: lm-evaluation-harness 0.4.13's task configs
# (lm_eval/tasks/<task>/*.yaml), restated per class below; tests/test_eval_protocols.py pins both.

PAPER_ARC = ("Answer the question below by choosing the correct choice.\n\n{question}\n\n"
             "{choices[label][0]}: {choices[text][0]}\n{choices[label][1]}: {choices[text][1]}\n"
             "{choices[label][2]}: {choices[text][2]}\n{choices[label][3]}: {choices[text][3]}\n\n"
             "You must respond with the letter corresponding to the correct choice without any explanation.")
PAPER_OPENBOOKQA = ("Complete the following passage or answer the question by choosing the correct choice.\n\n"
                    "{question_stem}\n\n"
                    "{choices[label][0]}: {choices[text][0]}\n{choices[label][1]}: {choices[text][1]}\n"
                    "{choices[label][2]}: {choices[text][2]}\n{choices[label][3]}: {choices[text][3]}\n\n"
                    "You must respond with the letter corresponding to the correct choice (A,B,C,D) without any "
                    "explanation.")
PAPER_HELLASWAG = ("You are provided with an incomplete passage below as well as 4 choices of continuation with only "
                   "one of them being the correct ending. Treat the endings as being labelled 0, 1, 2, 3 in order.\n\n"
                   "Passage: {ctx}\n\n0: {endings[0]}\n1: {endings[1]}\n2: {endings[2]}\n3: {endings[3]}\n\n"
                   "You must respond with the only number corresponding to the correct ending (0,1,2,3) for the "
                   "passage without any explanation.")
PAPER_PIQA = ("Choose the option that either answers the question, completes the sentence, or solves the problem. "
              "Pay attention to the properties of the objects in the question and how they interact with each other. "
              'If both options are correct, choose the one that is more convenient or more common.\n\n"""{goal}"""\n\n'
              "0: {sol1}\n1: {sol2}\n\nYou must respond with either `0` or `1` without any explanation.")
PAPER_WINOGRANDE = ("Given the following situation:\n\n{sentence}\n\nWhich option is correct?\n\n"
                    "Option 1: {option1}\n\nOption 2: {option2}\n\n"
                    "You must respond with either `1` or `2` without any explanation.")
PAPER_BOOLQ = "{passage}\n\nQuestion: {question}?\n\nPlease answer with either `true` or `false` without any explanation."
PAPER_GSM8K = "Please answer the following question: {question}\n\n"
PAPER_GSM8K_PREFILL = "Let's think step by step."


def _paper_format(bench: Benchmark, template: str, row: dict) -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError) as exc:
        raise T2LError(f"benchmark '{bench.name}': the paper's template needs {exc}, which the data row lacks") from None


def _cloze(context: str, choices: list[str], norm: bool = True) -> dict:
    """lm-eval multiple choice: the continuation is target_delimiter " " + the choice text."""
    return {"cloze": [(context, " " + c) for c in choices], "norm_lengths": [len(c) for c in choices] if norm else None}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval 0.4.13 lm_eval/tasks/hellaswag/utils.py ``preprocess`` (WikiHow bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class _ChoicesBenchmark(T2LMetadataBenchmark):
    """ARC / OpenBookQA: ``choices: {label, text}`` and ``answerKey``."""

    protocols = (CHAT, PAPER, LM_EVAL)
    question_field: ClassVar[str] = "question"
    paper_template: ClassVar[str] = PAPER_ARC

    def _gold(self, row: dict) -> int:
        labels = list(row["choices"]["label"])
        key = str(row["answerKey"]).strip()
        if key not in labels:
            raise T2LError(f"benchmark '{self.name}': item {row['id']} answer {row['answerKey']!r} not in {labels}")
        return labels.index(key)

    def build_examples(self, protocol: str) -> list[Example]:
        out = []
        for row in read_jsonl(self.path(self.files[0])):
            labels, texts, gold = list(row["choices"]["label"]), list(row["choices"]["text"]), self._gold(row)
            if protocol == PAPER:
                # the reference pads 3-option items to 4 ("N/A", next label); a 5th option is not shown
                pad = 4 - len(texts)
                if pad > 0:
                    more = [str(len(labels) + i + 1) for i in range(pad)] if labels[0].isdigit() else \
                        ["ABCD"[len(labels) + i] for i in range(pad)]
                    labels, texts = labels + more, texts + ["N/A"] * pad
                shown = dict(row, choices={"label": labels, "text": texts})
                out.append(Example(str(row["id"]), _paper_format(self, self.paper_template, shown), self.name, gold,
                                   labels, texts, target=str(row["answerKey"]), system=""))
            elif protocol == LM_EVAL:
                out.append(Example(str(row["id"]), "", self.name, gold, labels, texts,
                                   **_cloze(self.cloze_context(row), texts)))
            else:
                out.append(Example(str(row["id"]), self.render(row), self.name, gold, labels, texts))
        return out

    def cloze_context(self, row: dict) -> str:
        """lm-eval 0.4.13 arc_easy.yaml / arc_challenge.yaml: ``Question: {{question}}\\nAnswer:``."""
        return f"Question: {row['question']}\nAnswer:"


class ARCChallenge(_ChoicesBenchmark):
    name, files = "arc_challenge", ("eval/arc_challenge/test.jsonl.gz", "t2l/tasks/arc_challenge/metadata.yaml")


class ARCEasy(_ChoicesBenchmark):
    name, files = "arc_easy", ("eval/arc_easy/test.jsonl.gz", "t2l/tasks/arc_easy/metadata.yaml")


class OpenBookQA(_ChoicesBenchmark):
    name, files = "openbookqa", ("eval/openbookqa/test.jsonl.gz", "t2l/tasks/openbookqa/metadata.yaml")
    paper_template = PAPER_OPENBOOKQA

    def cloze_context(self, row: dict) -> str:
        """lm-eval 0.4.13 openbookqa.yaml: ``doc_to_text: question_stem`` (no "Question:")."""
        return row["question_stem"]


class BoolQ(T2LMetadataBenchmark):
    name, files = "boolq", ("eval/boolq/validation.jsonl.gz", "t2l/tasks/boolq/metadata.yaml")
    protocols, paper_match = (CHAT, PAPER, LM_EVAL), "bool"

    def build_examples(self, protocol: str) -> list[Example]:
        out = []
        for i, row in enumerate(read_jsonl(self.path(self.files[0]))):
            gold = 0 if row["answer"] else 1
            if protocol == PAPER:  # the reference's target is str(answer): "True" / "False"
                out.append(Example(f"boolq-{i}", _paper_format(self, PAPER_BOOLQ, row), self.name, gold,
                                   ["true", "false"], ["true", "false"], target=str(row["answer"]), system=""))
            elif protocol == LM_EVAL:  # super_glue/boolq/default.yaml: choices [no, yes], acc only
                context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
                out.append(Example(f"boolq-{i}", "", self.name, 1 if row["answer"] else 0, ["no", "yes"],
                                   ["no", "yes"], **_cloze(context, ["no", "yes"], norm=False)))
            else:
                out.append(Example(f"boolq-{i}", self.render(row), self.name, gold, ["true", "false"],
                                   ["true", "false"]))
        return out


class HellaSwag(T2LMetadataBenchmark):
    name, files = "hellaswag", ("eval/hellaswag/validation.jsonl.gz", "t2l/tasks/hellaswag/metadata.yaml")
    protocols = (CHAT, PAPER, LM_EVAL)

    def build_examples(self, protocol: str) -> list[Example]:
        out = []
        for i, row in enumerate(read_jsonl(self.path(self.files[0]))):
            eid, gold, endings = f"hellaswag-{row['ind']}-{i}", int(row["label"]), list(row["endings"])
            labels = [str(k) for k in range(len(endings))]
            if protocol == PAPER:
                out.append(Example(eid, _paper_format(self, PAPER_HELLASWAG, row), self.name, gold, labels, endings,
                                   target=str(row["label"]), system=""))
            elif protocol == LM_EVAL:  # hellaswag.yaml + utils.process_docs
                query = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " "
                                             + row["ctx_b"].capitalize())
                choices = [hellaswag_preprocess(e) for e in endings]
                out.append(Example(eid, "", self.name, gold, labels, choices, **_cloze(query, choices)))
            else:
                out.append(Example(eid, self.render(row), self.name, gold, labels, endings))
        return out


class PIQA(T2LMetadataBenchmark):
    name, files = "piqa", ("eval/piqa/validation.jsonl.gz", "t2l/tasks/piqa/metadata.yaml")
    protocols = (CHAT, PAPER, LM_EVAL)

    def build_examples(self, protocol: str) -> list[Example]:
        out = []
        for i, row in enumerate(read_jsonl(self.path(self.files[0]))):
            gold, options = int(row["label"]), [row["sol1"], row["sol2"]]
            if protocol == PAPER:
                out.append(Example(f"piqa-{i}", _paper_format(self, PAPER_PIQA, row), self.name, gold, ["0", "1"],
                                   options, target=str(row["label"]), system=""))
            elif protocol == LM_EVAL:  # piqa.yaml
                out.append(Example(f"piqa-{i}", "", self.name, gold, ["0", "1"], options,
                                   **_cloze(f"Question: {row['goal']}\nAnswer:", options)))
            else:
                out.append(Example(f"piqa-{i}", self.render(row), self.name, gold, ["0", "1"], options))
        return out


class WinoGrande(T2LMetadataBenchmark):
    name, files = "winogrande", ("eval/winogrande/validation.jsonl.gz", "t2l/tasks/winogrande/metadata.yaml")
    protocols = (CHAT, PAPER, LM_EVAL)

    def build_examples(self, protocol: str) -> list[Example]:
        out = []
        for i, row in enumerate(read_jsonl(self.path(self.files[0]))):
            gold, options = int(row["answer"]) - 1, [row["option1"], row["option2"]]
            if protocol == PAPER:
                out.append(Example(f"winogrande-{i}", _paper_format(self, PAPER_WINOGRANDE, row), self.name, gold,
                                   ["1", "2"], options, target=str(row["answer"]), system=""))
            elif protocol == LM_EVAL:
                # default.yaml + preprocess_winogrande.py, partial scoring: each option fills the blank
                # of the context, and the same rest of the sentence is scored after it; acc only
                sentence = row["sentence"]
                if "_" not in sentence:
                    raise T2LError(f"benchmark '{self.name}': item {i} has no blank '_' in its sentence")
                cut = sentence.index("_")
                rest = " " + sentence[cut + 1:].strip()
                out.append(Example(f"winogrande-{i}", "", self.name, gold, ["1", "2"], options,
                                   cloze=[(sentence[:cut] + o, rest) for o in options]))
            else:
                out.append(Example(f"winogrande-{i}", self.render(row), self.name, gold, ["1", "2"], options))
        return out


class GSM8K(T2LMetadataBenchmark):
    name, kind, metric, max_new_tokens = "gsm8k", "final_number", "em", 256
    files = ("eval/gsm8k/test.jsonl.gz", "t2l/tasks/gsm8k/metadata.yaml")
    protocols = (CHAT, PAPER)

    def build_examples(self, protocol: str) -> list[Example]:
        from t2l_framework.eval.scoring import gsm8k_gold, reference_number

        rows = read_jsonl(self.path(self.files[0]))
        if protocol == PAPER:  # gold: the last number of the answer field, as an integer (vllm_eval.eval_gsm8k)
            golds = [reference_number(row["answer"]) for row in rows]
            return [Example(f"gsm8k-{i}", _paper_format(self, PAPER_GSM8K, row), self.name,
                            None if g is None else int(g), system="", prefill=PAPER_GSM8K_PREFILL)
                    for i, (row, g) in enumerate(zip(rows, golds))]
        return [Example(f"gsm8k-{i}", self.render(row), self.name, gsm8k_gold(row["answer"]))
                for i, row in enumerate(rows)]


def _before_fence(answer: str) -> str:
    """The reference's completion body: everything before the first ``` (fishfarm evalplus)."""
    end = answer.find("```")
    return answer if end < 0 else answer[:end]


class ProgramGraded:
    """Mixin for code benchmarks: each answer becomes a program (``program``) run in the sandbox;
    pass@1 = the share of programs that exit 0."""

    runs_programs: ClassVar[bool] = True

    def stop_texts(self, protocol: str) -> tuple[str, ...]:
        # paper: the reference keeps what comes before the first ```; stopping there changes nothing
        return ("```",) if self.protocol(protocol) == PAPER else self.stop

    def grade(self, examples: list[Example], answers: list[str], protocol: str,
              context: GradeContext | None = None) -> Graded:
        from t2l_framework.eval import scoring
        from t2l_framework.eval.sandbox import SandboxLimits, run_many

        context = context or GradeContext()
        programs = [self.program(ex, answer, protocol) for ex, answer in zip(examples, answers)]
        results = run_many(programs, SandboxLimits(timeout_s=context.code_timeout_s), progress=context.progress)
        metric = scoring.PassAtOne()
        metric.update([r.passed for r in results])
        return Graded(metric.scores(), {"status": [r.status for r in results]})


class HumanEval(ProgramGraded, T2LMetadataBenchmark):
    name, kind, metric, max_new_tokens = "humaneval", "code", "pass@1", 384
    stop = ("\n```",)  # the closing fence: what a chat model writes after it is prose
    files = ("eval/humaneval/HumanEval.jsonl.gz", "t2l/tasks/humaneval/metadata.yaml")
    protocols = (CHAT, PAPER)

    def build_examples(self, protocol: str) -> list[Example]:
        out = []
        for row in read_jsonl(self.path(self.files[0])):
            tests = {"kind": "humaneval", "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}
            if protocol == PAPER:  # fishfarm evalplus data.map_humaneval_problem: the answer starts with the prompt
                code = row["prompt"].strip()
                out.append(Example(row["task_id"], f"Write a solution to the following problem:\n```python\n{code}\n```",
                                   self.name, None, tests=tests, system="", prefill=f"```python\n{code}"))
            else:
                out.append(Example(row["task_id"], self.render(row), self.name, None, tests=tests))
        return out

    def program(self, example: Example, answer: str, protocol: str) -> str:
        from t2l_framework.eval import scoring

        t = example.tests
        if self.protocol(protocol) == PAPER:  # evalplus: solution = problem prompt + completion
            return f"{t['prompt']}{_before_fence(answer)}\n\n\n{t['test'].strip(chr(10))}\n\n\ncheck({t['entry_point']})\n"
        return scoring.humaneval_program(t["prompt"], scoring.extract_code(answer), t["test"], t["entry_point"])


class MBPP(ProgramGraded, T2LMetadataBenchmark):
    """MBPP sanitized, test split (task ids 11-510); the prompt shows the first assertion, as in T2L."""

    name, kind, metric, max_new_tokens = "mbpp", "code", "pass@1", 384
    stop = ("\n```",)
    files = ("eval/mbpp/sanitized-mbpp.json.gz", "t2l/tasks/mbpp/metadata.yaml")
    protocols = (CHAT, PAPER)

    def build_examples(self, protocol: str) -> list[Example]:
        rows = json.loads(read_text(self.path(self.files[0])))
        out = []
        for row in sorted(rows, key=lambda r: r["task_id"]):
            if not 11 <= row["task_id"] <= 510:
                continue
            tests = {"kind": "mbpp", "test_imports": list(row.get("test_imports") or []), "tests": list(row["test_list"])}
            if protocol == PAPER:  # fishfarm evalplus data.map_mbpp_problem
                text = row["prompt"].strip()
                text += "" if text.endswith(".") else "."
                user = (f"{text} Your code should satisfy the following assertion:\n```python\n"
                        f"{row['test_list'][0].strip()}\n```")
                out.append(Example(f"mbpp-{row['task_id']}", user, self.name, None, tests=tests, system="",
                                   prefill="```python"))
            else:
                fields = {"prompt": row["prompt"], "assertions": row["test_list"][0]}
                out.append(Example(f"mbpp-{row['task_id']}", self.render(fields), self.name, None, tests=tests))
        return out

    def program(self, example: Example, answer: str, protocol: str) -> str:
        from t2l_framework.eval import scoring

        t = example.tests
        code = _before_fence(answer) if self.protocol(protocol) == PAPER else scoring.extract_code(answer)
        return scoring.mbpp_program(code, t["test_imports"], t["tests"])


class SNIUnseen(Benchmark):
    """T2L's held-out SNI tasks (never trained on) present in the bundle, scored by ROUGE-L.

    Each task keeps its own three evaluation descriptions; the prompt is the instance input,
    as in training. ``--limit`` takes items round-robin over the tasks.
    """

    name, kind, metric, max_new_tokens = "sni_unseen", "rouge", "rouge_l", 32
    files = ("sni/tasks.jsonl.gz", "sni/instances.jsonl.gz")

    @cached_property
    def tasks(self) -> dict:
        from t2l_framework.data.tasks import load_tasks

        every = load_tasks(self.path(self.files[0]), self.path(self.files[1]))
        return {tid: t for tid, t in sorted(every.items()) if t.role == "eval_unseen" and t.test}

    def descriptions(self, task: str) -> list[str]:
        t = self.tasks[task]
        return list(t.eval_descriptions or t.descriptions)

    def load_examples(self) -> list[Example]:
        per_task = [[Example(f"{tid}-{i}", inst.input, tid, list(inst.outputs)) for i, inst in enumerate(t.test)]
                    for tid, t in self.tasks.items()]
        out = []
        for i in range(max((len(p) for p in per_task), default=0)):
            out += [p[i] for p in per_task if i < len(p)]
        return out


class RunSplit(Benchmark):
    """A run's own held-out SNI items (``T2LDataModule.eval_items``), scored by ROUGE-L.

    ``t2l eval RUN --benchmarks sni_unseen`` (the run's never-trained tasks) and ``sni_seen`` (held-out
    instances of its training tasks) are these, and so is the end-of-training table: each item is
    asked with its own held-out description, its prompt formatted and cut as in training
    (``data.system_prompt``, ``data.max_prompt_tokens``), its answer up to ``eval.max_new_tokens``.
    """

    kind, metric = "rouge", "rouge_l"

    def __init__(self, name: str, items: Sequence, max_new_tokens: int, max_prompt_tokens: int,
                 system_prompt: str = ""):
        """items: ``EvalItem``s (id, task, input, answers, description)."""
        super().__init__()
        self.name, self.max_new_tokens = name, int(max_new_tokens)
        self.max_prompt_tokens, self.system_prompt = int(max_prompt_tokens), system_prompt
        self._examples = [Example(it.id, it.input, it.task, list(it.answers), description=it.description)
                          for it in items]
        self._descriptions: dict[str, list[str]] = {}
        for ex in self._examples:
            self._descriptions.setdefault(ex.task, [])
            if ex.description not in self._descriptions[ex.task]:
                self._descriptions[ex.task].append(ex.description)

    def load_examples(self) -> list[Example]:
        return list(self._examples)

    def descriptions(self, task: str) -> list[str]:
        """The held-out descriptions the task's items are asked with (the controls draw from them)."""
        return list(self._descriptions[task])

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{type(self).__qualname__}:{self.name}:{self.version}:{self.max_prompt_tokens}:"
                           f"{self.system_prompt}".encode())
        for ex in self._examples:
            h.update(json.dumps([ex.id, ex.prompt, ex.gold, ex.description]).encode())
        return h.hexdigest()[:16]


BUILTIN_BENCHMARKS: list[type[Benchmark]] = [ARCChallenge, ARCEasy, BoolQ, GSM8K, HellaSwag, OpenBookQA, PIQA,
                                             WinoGrande, HumanEval, MBPP, SNIUnseen]
PAPER_BENCHMARKS = [b.name for b in BUILTIN_BENCHMARKS if b is not SNIUnseen]
