"""Evaluation protocols: ``lm-eval`` prompts pinned to lm-evaluation-harness's task configs for
every vendored item, ``paper`` prompts and matching rules pinned to the T2L reference, the
lm-eval scoring rules (acc / acc_norm by numpy argmax, the harness's token split)."""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jinja2
import numpy as np
import pytest
import yaml

from t2l_framework.assembly import get_benchmarks
from t2l_framework.data.files import read_text
from t2l_framework.eval.benchmarks import PAPER_ARC, PAPER_WINOGRANDE
from t2l_framework.eval.loglik import encode_pair
from t2l_framework.eval.protocols import PROTOCOLS, paper_chat_text, reference_chat_template
from t2l_framework.eval.scoring import (ClozeAccuracy, ReferenceBoolAccuracy, ReferenceChoiceAccuracy,
                                        ReferenceNumberAccuracy)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DATA = Path(__file__).resolve().parents[1] / "data" / "eval"
FORMATS = yaml.safe_load((FIXTURES / "eval_lm_eval_formats.yaml").read_text())
ANSWERS = yaml.safe_load((FIXTURES / "eval_paper_answers.yaml").read_text())
FILES = {"arc_easy": "arc_easy/test.jsonl.gz", "arc_challenge": "arc_challenge/test.jsonl.gz", "boolq": "boolq/validation.jsonl.gz",
         "hellaswag": "hellaswag/validation.jsonl.gz", "openbookqa": "openbookqa/test.jsonl.gz", "piqa": "piqa/validation.jsonl.gz",
         "winogrande": "winogrande/validation.jsonl.gz"}

# As lm_eval.utils renders doc_to_* templates (no autoescape, trailing newlines kept).
ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@functools.lru_cache(maxsize=None)
def _compiled(template: str) -> jinja2.Template:
    return ENV.from_string(template)


def _render(template: str, doc: dict) -> str:
    return _compiled(template).render(**doc)


def _harness_requests(name: str, doc: dict) -> tuple[list[tuple[str, str]], int, list[int] | None]:
    """(context, continuation) per option, gold index and acc_norm lengths, from the fixture formats."""
    fmt, delim = FORMATS["tasks"][name], FORMATS["target_delimiter"]
    doc = dict(doc)
    for field, template in (fmt.get("rename") or {}).items():
        doc[field] = _render(template, doc)
    if "process_docs" in fmt:
        steps = fmt["process_docs"]["preprocess"]

        def pre(text: str) -> str:
            for step in steps:
                if step[0] == "strip":
                    text = text.strip()
                elif step[0] == "replace":
                    text = text.replace(step[1], step[2])
                else:
                    text = re.sub(step[1], step[2], text)
            return text
        doc = dict(doc, query=pre(_render(fmt["process_docs"]["query"], doc)),
                   choices=[pre(e) for e in doc[fmt["process_docs"]["choices"]]])
    choices = ast.literal_eval(_render(fmt["doc_to_choice"], doc))  # the harness literal_evals list templates
    if fmt.get("partial"):  # multiple_input: contexts per option, one continuation
        gold = int(_render(fmt["doc_to_text"], doc))
        continuation = _render(fmt["doc_to_target"], doc)
        requests = [(c, delim + continuation) for c in choices]
    else:
        gold = int(_render(fmt["doc_to_target"], doc))
        context = _render(fmt["doc_to_text"], doc)
        requests = [(context, delim + c) for c in choices]
    lengths = [float(len(c)) for c in choices] if "acc_norm" in fmt["metrics"] else None
    return requests, gold, lengths


@pytest.mark.parametrize("name", list(FILES))
def test_lm_eval_prompts_equal_the_harness_formats_for_every_vendored_item(name):
    (bench,) = get_benchmarks([name])
    examples = bench.examples(0, "lm-eval")
    rows = [json.loads(line) for line in read_text(DATA / FILES[name]).splitlines() if line.strip()]
    assert len(examples) == len(rows) > 100
    for ex, row in zip(examples, rows):
        requests, gold, lengths = _harness_requests(name, row)
        assert ex.cloze == requests, (name, ex.id)
        assert ex.gold == gold, (name, ex.id)
        assert ex.norm_lengths == lengths, (name, ex.id)


def test_lm_eval_formats_cover_the_tricky_rows():
    """The pinned rows include what the formats exist for: bracket artifacts, partial scoring."""
    (hs,) = get_benchmarks(["hellaswag"])
    raw = [json.loads(line) for line in read_text(DATA / FILES["hellaswag"]).splitlines()]
    i = next(k for k, r in enumerate(raw) if "[title]" in r["ctx"])
    context = hs.examples(0, "lm-eval")[i].cloze[0][0]
    assert "[" not in context and ". " in context
    (wg,) = get_benchmarks(["winogrande"])
    ex = wg.examples(1, "lm-eval")[0]
    assert [c for c, _ in ex.cloze] == ["Sarah was a much better surgeon than Maria so Sarah",
                                        "Sarah was a much better surgeon than Maria so Maria"]
    assert {cont for _, cont in ex.cloze} == {" always got the easier cases."} and ex.gold == 1


def test_encode_pair_splits_like_the_harness():
    class Chars:  # one token per character; the tokenizer adds a BOS id 0 with special tokens
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) for c in text]}

    ctx, cont = encode_pair(Chars(), "Question: x\nAnswer: ", "yes")  # the trailing space moves over
    assert ctx == [0] + [ord(c) for c in "Question: x\nAnswer:"] and cont == [ord(c) for c in " yes"]
    ctx, cont = encode_pair(Chars(), "ab", " c", add_special_tokens=False)
    assert ctx == [97, 98] and cont == [32, 99]


def test_cloze_accuracy_is_the_harness_argmax():
    lls = [[-4.0, -6.0, -5.0], [-10.0, -12.0], [-3.0, -3.0]]
    lengths = [[2, 12, 5], [4, 12], [1, 1]]
    acc, norm = ClozeAccuracy(), ClozeAccuracy(normalize=True)
    acc.update(lls, [0, 1, 1])
    norm.update(lls, [1, 1, 0], lengths)
    assert acc.scores() == [1.0, 0.0, 0.0]  # ties go to the first option
    assert norm.scores() == [1.0, 1.0, 1.0]  # -6/12 beats -4/2; -12/12 beats -10/4
    assert [ClozeAccuracy.choose(lp, n) for lp, n in zip(lls, lengths)] == \
        [int(np.argmax(np.array(lp) / np.array(n))) for lp, n in zip(lls, lengths)]


# --- paper ------------------------------------------------------------------------------------


@pytest.mark.parametrize("generated, target, correct", ANSWERS["choice"])
def test_paper_choice_matching_reproduces_the_reference(generated, target, correct):
    metric = ReferenceChoiceAccuracy()
    metric.update([generated], [target])
    assert metric.scores() == [float(correct)]


@pytest.mark.parametrize("generated, target, correct", ANSWERS["bool"])
def test_paper_boolq_matching_reproduces_the_reference(generated, target, correct):
    metric = ReferenceBoolAccuracy()
    metric.update([generated], [target])
    assert metric.scores() == [float(correct)]


@pytest.mark.parametrize("generated, gold, correct", ANSWERS["number"])
def test_paper_gsm8k_matching_reproduces_the_reference(generated, gold, correct):
    metric = ReferenceNumberAccuracy()
    metric.update([generated], [gold])
    assert metric.scores() == [float(correct)]


def test_paper_examples_use_the_reference_prompts_targets_and_grading():
    benches = {b.name: b for b in get_benchmarks(["paper"])}
    arc = benches["arc_easy"].examples(0, "paper")
    rows = [json.loads(line) for line in read_text(DATA / FILES["arc_easy"]).splitlines()]
    k = next(i for i, r in enumerate(rows) if len(r["choices"]["label"]) == 3)
    padded = dict(rows[k], choices={"label": rows[k]["choices"]["label"] + ["D"],
                                    "text": rows[k]["choices"]["text"] + ["N/A"]})
    assert arc[k].prompt == PAPER_ARC.format(**padded) and arc[k].target == rows[k]["answerKey"]
    assert arc[k].system == "" and arc[k].prefill is None
    five = next(e for e in benches["arc_challenge"].examples(0, "paper") if len(e.labels) == 5)
    assert "\nD: " in five.prompt and "\nE: " not in five.prompt  # the reference shows four options
    wg = benches["winogrande"].examples(1, "paper")[0]
    assert wg.prompt == PAPER_WINOGRANDE.format(**json.loads(read_text(DATA / FILES["winogrande"]).splitlines()[0]))
    assert "\n\nOption 2: " in wg.prompt and wg.target == "2"
    assert benches["boolq"].examples(1, "paper")[0].target == "False"
    gsm = benches["gsm8k"].examples(1, "paper")[0]
    assert gsm.prompt.endswith("\n\n") and gsm.prefill == "Let's think step by step." and gsm.gold == 18
    he = benches["humaneval"].examples(1, "paper")[0]
    assert he.prefill.startswith("```python\nfrom typing import List") and he.prefill in "```python\n" + he.prompt
    assert benches["humaneval"].answer_length("paper") == 512 and benches["arc_easy"].answer_length("paper") == 512
    # grading goes by the reference's rules: "Answer: B" is read as A
    assert benches["arc_easy"].grade([arc[0]], ["Answer: B"], "paper") == [float(arc[0].target == "A")]
    assert benches["boolq"].grade(benches["boolq"].examples(1, "paper"), ["I do not know"], "paper") == [1.0]
    # and the code programs start from the prompt the answer continued
    program = benches["humaneval"].program(he, "    return 1\n```\nprose", "paper")
    assert program.startswith(he.tests["prompt"] + "    return 1\n") and "prose" not in program


def test_benchmarks_fall_back_to_chat_where_a_protocol_is_undefined():
    benches = {b.name: b for b in get_benchmarks(["all"])}
    assert benches["gsm8k"].protocol("lm-eval") == "chat" and benches["sni_unseen"].protocol("paper") == "chat"
    assert benches["arc_easy"].scoring("lm-eval") == "cloze" and benches["arc_easy"].scoring("paper") == "generate"
    assert benches["arc_easy"].scoring("chat") == "loglik" and benches["arc_easy"].scoring("chat", generate=True) == "generate"
    assert set(PROTOCOLS) == {"paper", "lm-eval", "chat"}


def test_paper_chat_text_uses_the_reference_templates_with_an_empty_system_turn(tiny_tokenizer):
    from t2l_framework.llm.families import LLAMA, MISTRAL

    tok = tiny_tokenizer
    tok.bos_token = "<s>"

    def runtime(name, family):
        return SimpleNamespace(tokenizer=tok, base=SimpleNamespace(family=family), base_model_name=name,
                               chat_template=True, format=lambda user: f"FORMAT({user})")

    mistral = runtime("mistralai/Mistral-7B-Instruct-v0.2", MISTRAL)
    assert reference_chat_template(mistral.base_model_name) is not None
    assert paper_chat_text(mistral, "Q?", "") == "<s> [INST] \n\nQ? [/INST]"  # the reference's own template
    other = runtime("some/llama-like", LLAMA)  # the model's template, with the (empty) system turn
    assert paper_chat_text(other, "Q?", "") == tok.apply_chat_template(
        [{"role": "system", "content": ""}, {"role": "user", "content": "Q?"}], tokenize=False,
        add_generation_prompt=True)
    folded = runtime("some/mistral-like", MISTRAL)  # template without a system role: folded as the reference does
    assert paper_chat_text(folded, "Q?", "") == tok.apply_chat_template(
        [{"role": "user", "content": "\n\nQ?"}], tokenize=False, add_generation_prompt=True)


@pytest.fixture
def tiny_tokenizer():
    from tests.tiny_world import CHAT_TEMPLATE, word_tokenizer

    tok = word_tokenizer(["Q? <system> <user> <assistant>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok
