"""Answer extraction and scoring (t2l_framework.eval.scoring) on handcrafted and real benchmark rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from t2l_framework.data.files import read_text
from t2l_framework.eval.scoring import (ChoiceExtractionAccuracy, FinalNumberAccuracy, MultipleChoiceAccuracy,
                                        PassAtOne, RougeL, canonical_number, extract_choice, extract_code,
                                        extract_final_number, gsm8k_gold, humaneval_program, mbpp_program,
                                        numbers_equal, select_option)

DATA = Path(__file__).resolve().parents[1] / "data" / "eval"


def _exit_code(program: str) -> int:
    return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60).returncode


# --- GSM8K ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("She has 3 apples and buys 5 more, so 3 + 5 = 8. The answer is 8.", "8"),
    ("Each box holds 250 pens, 250 * 5 = 1,234 pens in all.\n#### 1,234", "1234"),
    ("#### 1,234\nThat is because 1000 + 234 = 1234 and 7 more", "1234"),
    ("The ticket costs 9 * 2 = $18.00.", "18"),
    ("3 + 4 = 7 and 7 * 6 = 42, so the total is 42 dollars. Then 7 friends", "7"),  # last number rule
    (r"We get 2 + 3 = 5, so the result is \boxed{5}. Double check: 5 * 2 = 10", "5"),
    (r"So $x = \boxed{\frac{3}{4}}$ of the cake, i.e. 6 of 8 slices", "0.75"),
    (r"\boxed{1{,}250 \text{ dollars}}", "1250"),
    ("He loses 12 - 17 = -5 dollars, so the final answer is -5.", "-5"),
    ("The answer is 12. Check: 12 * 2 = 24", "12"),
    ("Final answer: **$1,234.50**", "1234.5"),
    ("The discount is 25%", "25"),
    ("Answer: she has 3 apples and 3 + 5 = 8", "8"),  # the phrase is not followed by a number
    ("10-4=6", "6"),  # a minus sign after a digit is a subtraction
    ("half of it: 3/4", "0.75"),
    ("no numbers here", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_gsm8k_gold_from_real_rows():
    rows = [json.loads(line) for line in read_text(DATA / "gsm8k" / "test.jsonl.gz").splitlines()[:3]]
    assert rows[0]["answer"].endswith("#### 18")  # Janet's ducks
    assert gsm8k_gold(rows[0]["answer"]) == "18"
    assert rows[2]["answer"].endswith("#### 70000")  # the answer field also holds "$<<...>>70,000"
    assert gsm8k_gold(rows[2]["answer"]) == "70000"
    assert gsm8k_gold("so 1,000 + 234 = 1,234\n#### 1,234") == "1234"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker 12")


@pytest.mark.parametrize("a, b, equal", [
    ("18", "18.00", True), ("1,234", "1234", True), ("$5", "5", True), ("0.75", "3/4", True),
    ("3.0000001", "3", True), ("3.001", "3", False), ("-5", "5", False), ("8", "80", False),
    (None, "8", False), (None, None, False), ("1/3", "0.3333333333", True),
])
def test_numbers_equal(a, b, equal):
    assert numbers_equal(a, b) is equal
    assert numbers_equal(b, a) is equal


def test_canonical_number():
    assert [canonical_number(s) for s in ["18.00", "$1,234", "0.50", "-0", "12%", "1/8", "2/6", "x"]] == \
        ["18", "1234", "0.5", "0", "12", "0.125", "1/3", None]


# --- multiple choice --------------------------------------------------------------------------


def test_select_option_ties_nan_and_errors():
    assert select_option([-1.0, -0.5, -0.5]) == 1  # tie -> first of the best
    assert select_option([-2.0, -2.0]) == 0
    assert select_option([float("nan"), -3.0, -1.0]) == 2  # NaN never wins
    assert select_option([-3.0, float("nan"), -4.0]) == 0
    assert select_option([float("nan"), float("nan")]) == 0
    with pytest.raises(ValueError):
        select_option([])
    with pytest.raises(ValueError):
        select_option([-1.0, -2.0], [3])


def test_select_option_normalisation_changes_winner():
    # the long option has the lower total log-likelihood (more tokens to pay for) but the
    # higher per-byte one: -10 / 40 = -0.25 > -4 / 4 = -1
    logprobs, lengths = [-4.0, -10.0], [4, 40]
    assert select_option(logprobs) == 0
    assert select_option(logprobs, lengths) == 1
    assert select_option([-4.0, -8.0], [4, 8]) == 0  # equal per-byte scores -> first


LETTERS = ["A", "B", "C", "D"]
ANIMALS = ["a dog", "a bird", "a cat", "a fish"]


@pytest.mark.parametrize("text, labels, texts, expected", [
    ("B", LETTERS, None, 1),
    ("B.", LETTERS, None, 1),
    ("B: a bird", LETTERS, ANIMALS, 1),
    ("(B)", LETTERS, None, 1),
    ("**B**", LETTERS, None, 1),
    (" b) because birds fly", LETTERS, None, 1),
    ("D\nExplanation: fish swim", LETTERS, ANIMALS, 3),
    ("A cat sits on the mat.", LETTERS, ANIMALS, 2),  # a leading "A" word is not label A
    ("A cat", LETTERS, None, None),
    ("The correct answer is (C).", LETTERS, None, 2),
    ("I think the answer is C because cats purr.", LETTERS, ANIMALS, 2),
    ("The answer is a fish", LETTERS, ANIMALS, 3),  # "a" is not label A here: option text
    ("Answer: D", LETTERS, None, 3),
    ("It must be a bird.", LETTERS, ANIMALS, 1),  # option text
    ("Either a dog or a cat.", LETTERS, ANIMALS, None),  # two options named
    ("no idea", LETTERS, ANIMALS, None),
    ("2", ["1", "2"], ["the trophy", "the suitcase"], 1),
    ("Option 1", ["1", "2"], ["the trophy", "the suitcase"], 0),
    ("12", ["1", "2"], None, None),  # "12" is neither "1" nor "2"
    ("3", ["0", "1", "2", "3"], None, 3),
    ("The suitcase was too small.", ["1", "2"], ["the trophy", "the suitcase"], 1),
    ("True", ["true", "false"], ["true", "false"], 0),
    ("false.", ["true", "false"], ["true", "false"], 1),
    ("`false`", ["true", "false"], ["true", "false"], 1),
    ("Yes, the passage says so.", ["true", "false"], ["true", "false"], 0),
    ("No", ["true", "false"], ["true", "false"], 1),
    ("Not stated", ["true", "false"], ["true", "false"], None),
    ("Yes", ["A", "B"], None, None),  # yes/no only alias true/false labels
])
def test_extract_choice(text, labels, texts, expected):
    assert extract_choice(text, labels, texts) == expected


def test_extract_choice_longest_option_text_wins():
    texts = ["a cat", "a black cat", "a dog", "a bird"]
    assert extract_choice("It is a black cat.", LETTERS, texts) == 1
    assert extract_choice("It is a cat.", LETTERS, texts) == 0


# --- code -------------------------------------------------------------------------------------

BODY = "    return a + b\n"


@pytest.mark.parametrize("completion, expected", [
    (BODY + "```\n\nThis adds the numbers.", BODY),  # closing fence
    (BODY + "```", BODY),
    (BODY, BODY),  # no closing fence
    (BODY + "\nThis function simply adds the two numbers.\nIt runs in O(1).", BODY),  # trailing prose
    ("```python\ndef add(a, b):\n    return a + b\n```\nDone.", "def add(a, b):\n    return a + b\n"),
    ("Here is the code:\n```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a + b\n"),
    ("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",) * 2,  # a whole module, unchanged
])
def test_extract_code(completion, expected):
    assert extract_code(completion) == expected


@pytest.fixture(scope="module")
def humaneval_rows():
    return [json.loads(line) for line in read_text(DATA / "humaneval" / "HumanEval.jsonl.gz").splitlines()]


def test_humaneval_program_full_function_and_body(humaneval_rows):
    row = humaneval_rows[0]
    assert row["task_id"] == "HumanEval/0"
    prompt, solution, entry = row["prompt"], row["canonical_solution"], row["entry_point"]
    body_completion = solution + "```\nThe function compares every pair."
    full_completion = prompt.split("from typing import List\n", 1)[1].lstrip() + solution + "```"
    dedented_body = textwrap.dedent(solution)  # the model forgot the indentation
    for completion in (body_completion, full_completion, dedented_body):
        program = humaneval_program(prompt, extract_code(completion), row["test"], entry)
        assert program.rstrip().endswith(f"check({entry})")
        assert _exit_code(program) == 0, program
    assert "from typing import List" in humaneval_program(prompt, extract_code(full_completion), row["test"], entry)
    wrong = "    return False\n"
    assert _exit_code(humaneval_program(prompt, wrong, row["test"], entry)) != 0


def test_humaneval_program_keeps_prompt_helpers(humaneval_rows):
    row = next(r for r in humaneval_rows if r["task_id"] == "HumanEval/38")  # encode_cyclic + decode_cyclic
    full = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n"
    program = humaneval_program(row["prompt"], full, row["test"], row["entry_point"])
    assert "def encode_cyclic" in program and program.count("def decode_cyclic") == 1
    assert _exit_code(program) == 0


def test_mbpp_program_with_reference_code():
    rows = json.loads(read_text(DATA / "mbpp" / "sanitized-mbpp.json.gz"))
    row = next(r for r in rows if r["test_imports"])  # task 82: "import math" needed by the tests
    program = mbpp_program(row["code"], row["test_imports"], row["test_list"])
    assert program.startswith("import math")
    assert _exit_code(program) == 0
    broken = row["code"].replace("4/3", "1/3")
    assert _exit_code(mbpp_program(broken, row["test_imports"], row["test_list"])) != 0


# --- metrics ----------------------------------------------------------------------------------


def test_multiple_choice_accuracy():
    m = MultipleChoiceAccuracy()
    m.update([[-1.0, -2.0], [-3.0, -1.0]], [0, 0])
    m.update([[-5.0, -1.0, -9.0]], [1])
    assert m.scores() == [1.0, 0.0, 1.0]
    assert m.compute().item() == pytest.approx(2 / 3)
    norm = MultipleChoiceAccuracy(normalize=True)
    norm.update([[-4.0, -10.0]], [1], [[4, 40]])
    assert norm.scores() == [1.0]
    plain = MultipleChoiceAccuracy()
    plain.update([[-4.0, -10.0]], [1], [[4, 40]])  # lengths unused without normalize
    assert plain.scores() == [0.0]
    with pytest.raises(ValueError):
        norm.update([[-4.0, -10.0]], [1])  # acc_norm needs lengths
    with pytest.raises(ValueError, match="gold"):
        m.update([[-1.0, -2.0]], [0, 1])


def test_generation_metrics():
    c = ChoiceExtractionAccuracy()
    c.update(["B", "no idea"], [LETTERS, LETTERS], [1, 0], [ANIMALS, ANIMALS])
    c.update(["Yes"], [["true", "false"]], [0])
    assert c.scores() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="labels"):
        c.update(["B"], [LETTERS, LETTERS], [1])

    f = FinalNumberAccuracy()
    f.update(["so 2 + 2 = 4. The answer is 4.", "#### 1,234"], ["4", "1,234"])
    f.update(["I don't know", "It costs $18.00."], ["3", "18"])
    assert f.scores() == [1.0, 1.0, 0.0, 1.0]
    assert f.compute().item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="texts has 1"):
        f.update(["4"], ["4", "5"])

    p = PassAtOne()
    p.update([True, False])
    p.update([True])
    assert p.scores() == [1.0, 0.0, 1.0]
    assert p.compute().item() == pytest.approx(2 / 3)

    r = RougeL()
    r.update(["the cat sat", "dog"], [["a dog", "the cat sat"], "cat"])
    r.update(["x"], [["y"]])
    assert r.scores() == pytest.approx([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="references"):
        r.update(["a", "b"], [["a"]])


def test_empty_metric_is_nan():
    m = PassAtOne()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute() before update()
        assert math.isnan(m.compute().item())
    assert m.scores() == []
    m.update([])
    assert math.isnan(m.compute().item())
