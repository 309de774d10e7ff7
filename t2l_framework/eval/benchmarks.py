"""Evaluation benchmarks: examples, prompts and task descriptions read from the vendored data.

A ``Benchmark`` turns its data files into ``Example``s (the user turn, plus what scoring needs)
and names the task descriptions a hypernetwork gets. Built-ins follow T2L: the prompt templates
and the 200 generated descriptions of each benchmark come from ``data/t2l/tasks/<name>/metadata.yaml``.
Plugins register more through ``t2l_register_benchmarks`` (``register(name, BenchmarkSubclass)``).

Scoring kinds: ``multiple_choice`` (log-likelihood of each option, or generation + answer
extraction), ``final_number`` (GSM8K), ``code`` (pass@1 in the sandbox), ``rouge`` (SNI).
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import yaml

from t2l_framework.config import project_root
from t2l_framework.errors import T2LError

KINDS = ("multiple_choice", "final_number", "code", "rouge")


@dataclass
class Example:
    """One evaluation item.

    prompt: the user turn. task: whose descriptions apply (the benchmark, or an SNI task id).
    labels / options: multiple choice: what the model answers (``"B"``) and the option texts.
    gold: MC: index of the right option; final_number: the number; rouge: reference answers.
    tests: code: what the sandbox runs (see ``eval.scoring``).
    """

    id: str
    prompt: str
    task: str
    gold: Any
    labels: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    tests: dict = field(default_factory=dict)


class Benchmark(ABC):
    """Base class: set the class attributes, implement ``load_examples`` and ``descriptions``.

    ``version`` goes into the result-cache key: bump it when prompts or scoring change.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "multiple_choice"
    metric: ClassVar[str] = "acc"
    version: ClassVar[str] = "1"
    max_new_tokens: ClassVar[int] = 16  # generated answers (generation scoring, GSM8K, code)
    stop: ClassVar[tuple[str, ...]] = ()  # texts that end a generated answer early (besides EOS)
    files: ClassVar[tuple[str, ...]] = ()  # data files, relative to the data root

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

    # --- shared --------------------------------------------------------------------------------

    def examples(self, limit: int = 0) -> list[Example]:
        """The first ``limit`` examples (all for 0), in a fixed order."""
        items = self._examples
        return items[:limit] if limit > 0 else list(items)

    @cached_property
    def _examples(self) -> list[Example]:
        return self.load_examples()

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
            h.update(self.path(rel).read_bytes())
        return h.hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
        for key in ("descriptions", "user_prompt_template"):
            if not meta.get(key):
                raise T2LError(f"{path}: missing '{key}'")
        return meta

    def descriptions(self, task: str) -> list[str]:
        return list(self.metadata["descriptions"])

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


class _ChoicesBenchmark(T2LMetadataBenchmark):
    """ARC / OpenBookQA: ``choices: {label, text}`` and ``answerKey``."""

    def load_examples(self) -> list[Example]:
        out = []
        for row in read_jsonl(self.path(self.files[0])):
            labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
            if row["answerKey"] not in labels:
                raise T2LError(f"benchmark '{self.name}': item {row['id']} answer {row['answerKey']!r} not in {labels}")
            out.append(Example(str(row["id"]), self.render(row), self.name, labels.index(row["answerKey"]),
                               labels, texts))
        return out


class ARCChallenge(_ChoicesBenchmark):
    name, files = "arc_challenge", ("eval/arc_challenge/test.jsonl", "t2l/tasks/arc_challenge/metadata.yaml")


class ARCEasy(_ChoicesBenchmark):
    name, files = "arc_easy", ("eval/arc_easy/test.jsonl", "t2l/tasks/arc_easy/metadata.yaml")


class OpenBookQA(_ChoicesBenchmark):
    name, files = "openbookqa", ("eval/openbookqa/test.jsonl", "t2l/tasks/openbookqa/metadata.yaml")


class BoolQ(T2LMetadataBenchmark):
    name, files = "boolq", ("eval/boolq/validation.jsonl", "t2l/tasks/boolq/metadata.yaml")

    def load_examples(self) -> list[Example]:
        return [Example(f"boolq-{i}", self.render(row), self.name, 0 if row["answer"] else 1, ["true", "false"],
                        ["true", "false"]) for i, row in enumerate(read_jsonl(self.path(self.files[0])))]


class HellaSwag(T2LMetadataBenchmark):
    name, files = "hellaswag", ("eval/hellaswag/validation.jsonl", "t2l/tasks/hellaswag/metadata.yaml")

    def load_examples(self) -> list[Example]:
        return [Example(f"hellaswag-{row['ind']}-{i}", self.render(row), self.name, int(row["label"]),
                        [str(k) for k in range(len(row["endings"]))], list(row["endings"]))
                for i, row in enumerate(read_jsonl(self.path(self.files[0])))]


class PIQA(T2LMetadataBenchmark):
    name, files = "piqa", ("eval/piqa/validation.jsonl", "t2l/tasks/piqa/metadata.yaml")

    def load_examples(self) -> list[Example]:
        return [Example(f"piqa-{i}", self.render(row), self.name, int(row["label"]), ["0", "1"],
                        [row["sol1"], row["sol2"]]) for i, row in enumerate(read_jsonl(self.path(self.files[0])))]


class WinoGrande(T2LMetadataBenchmark):
    name, files = "winogrande", ("eval/winogrande/validation.jsonl", "t2l/tasks/winogrande/metadata.yaml")

    def load_examples(self) -> list[Example]:
        return [Example(f"winogrande-{i}", self.render(row), self.name, int(row["answer"]) - 1, ["1", "2"],
                        [row["option1"], row["option2"]])
                for i, row in enumerate(read_jsonl(self.path(self.files[0])))]


class GSM8K(T2LMetadataBenchmark):
    name, kind, metric, max_new_tokens = "gsm8k", "final_number", "em", 256
    files = ("eval/gsm8k/test.jsonl", "t2l/tasks/gsm8k/metadata.yaml")

    def load_examples(self) -> list[Example]:
        from t2l_framework.eval.scoring import gsm8k_gold

        return [Example(f"gsm8k-{i}", self.render(row), self.name, gsm8k_gold(row["answer"]))
                for i, row in enumerate(read_jsonl(self.path(self.files[0])))]


class HumanEval(T2LMetadataBenchmark):
    name, kind, metric, max_new_tokens = "humaneval", "code", "pass@1", 384
    stop = ("\n```",)  # the closing fence: what a chat model writes after it is prose
    files = ("eval/humaneval/HumanEval.jsonl", "t2l/tasks/humaneval/metadata.yaml")

    def load_examples(self) -> list[Example]:
        return [Example(row["task_id"], self.render(row), self.name, None,
                        tests={"kind": "humaneval", "prompt": row["prompt"], "test": row["test"],
                               "entry_point": row["entry_point"]})
                for row in read_jsonl(self.path(self.files[0]))]


class MBPP(T2LMetadataBenchmark):
    """MBPP sanitized, test split (task ids 11-510); the prompt shows the first assertion, as in T2L."""

    name, kind, metric, max_new_tokens = "mbpp", "code", "pass@1", 384
    stop = ("\n```",)
    files = ("eval/mbpp/sanitized-mbpp.json", "t2l/tasks/mbpp/metadata.yaml")

    def load_examples(self) -> list[Example]:
        rows = json.loads(self.path(self.files[0]).read_text(encoding="utf-8"))
        out = []
        for row in sorted(rows, key=lambda r: r["task_id"]):
            if not 11 <= row["task_id"] <= 510:
                continue
            fields = {"prompt": row["prompt"], "assertions": row["test_list"][0]}
            out.append(Example(f"mbpp-{row['task_id']}", self.render(fields), self.name, None,
                               tests={"kind": "mbpp", "test_imports": list(row.get("test_imports") or []),
                                      "tests": list(row["test_list"])}))
        return out


class SNIUnseen(Benchmark):
    """T2L's held-out SNI tasks (never trained on) present in the bundle, scored by ROUGE-L.

    Each task keeps its own three evaluation descriptions; the prompt is the instance input,
    as in training. ``--limit`` takes items round-robin over the tasks.
    """

    name, kind, metric, max_new_tokens = "sni_unseen", "rouge", "rouge_l", 32
    files = ("sni/tasks.jsonl", "sni/instances.jsonl")

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


BUILTIN_BENCHMARKS: list[type[Benchmark]] = [ARCChallenge, ARCEasy, BoolQ, GSM8K, HellaSwag, OpenBookQA, PIQA,
                                             WinoGrande, HumanEval, MBPP, SNIUnseen]
PAPER_BENCHMARKS = [b.name for b in BUILTIN_BENCHMARKS if b is not SNIUnseen]


def get_benchmarks(names: list[str], data_root: str | Path | None = None) -> list[Benchmark]:
    """Instantiate registered benchmarks by name ('paper' = the ten of the T2L paper, 'all')."""
    from t2l_framework.plugins import registry

    reg = registry()
    expanded: list[str] = []
    for name in names:
        if name == "paper":
            expanded += PAPER_BENCHMARKS
        elif name == "all":
            expanded += reg.names("benchmarks")
        else:
            expanded.append(name)
    out = []
    for name in dict.fromkeys(expanded):
        factory = reg.get("benchmarks", name, key="--benchmarks")
        bench = factory(data_root)
        if not isinstance(bench, Benchmark) or bench.kind not in KINDS:
            raise T2LError(f"benchmark '{name}' must be a Benchmark with kind in {KINDS}")
        bench.name = name  # the registered name is the one results are reported under
        out.append(bench)
    return out
