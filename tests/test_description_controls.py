"""Description-sensitivity controls: (d) another task's description, (f) random letters of the
same length, (g) one generic description; as `t2l eval` adapter conditions and as text rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from t2l_framework.assembly import get_benchmarks
from t2l_framework.data.description_controls import (
    GENERIC_DESCRIPTION, other_task_description, random_description,
)
from t2l_framework.errors import T2LError
from t2l_framework.eval.harness import EvalSettings, Evaluator, parse_adapters, pick_descriptions

CONTROLS = ["other_description", "random_description", "generic_description"]


def test_random_description_has_the_length_and_spaces_of_the_description_and_is_seeded():
    text = "Given a country, answer with its capital city."
    got = random_description(text, seed=3)
    assert len(got) == len(text) and got != text
    assert [i for i, c in enumerate(got) if c == " "] == [i for i, c in enumerate(text) if c == " "]
    assert all(c.islower() and c.isascii() for c in got.replace(" ", ""))
    assert got == random_description(text, seed=3) and got != random_description(text, seed=4)


def test_other_task_description_never_draws_the_task_itself():
    descs = {t: [f"{t} description {i}" for i in range(3)] for t in "abcd"}
    for k in range(200):
        got = other_task_description(f"k{k}", "b", list(descs), descs)
        assert got not in descs["b"] and any(got in d for d in descs.values())
    assert len({other_task_description(f"k{k}", "b", list(descs), descs) for k in range(200)}) > 3


class _RecordingGenerator:
    """Stands in for the run's hypernetwork: the 'adapter' of a text is the text itself."""

    identity, hypernet = "fake", SimpleNamespace(target_modules=[], rank=1)

    def adapters(self, texts):
        texts = list(texts)
        return SimpleNamespace(conform=lambda shapes, rank: SimpleNamespace(
            to=lambda device: SimpleNamespace(select=lambda i: texts[i])))


def _units(adapters: list[str], n_descriptions: int = 2):
    runtime = SimpleNamespace(generator=_RecordingGenerator(), injection=None, device="cpu", base_model_name="m",
                              dtype="float32", chat_template=None, context=0, retarget=lambda targets: None)
    ev = Evaluator(runtime, parse_adapters(adapters, have_run=True), EvalSettings(n_descriptions=n_descriptions),
                   show_progress=False)
    (bench,) = get_benchmarks(["sni_unseen"])
    examples = bench.examples(0, "chat")
    tasks = list(dict.fromkeys(e.task for e in examples))
    descs = {t: pick_descriptions(bench.descriptions(t), n_descriptions, 0, t) for t in tasks}
    units = ev._units(bench, examples, descs)
    ev._attach_weights(units, examples)
    return units, descs, bench


def test_eval_controls_give_the_hypernetwork_the_control_texts():
    units, descs, bench = _units(["t2l"] + CONTROLS)
    by = {name: [u for u in units if u.adapter.name == name] for name in ["t2l"] + CONTROLS}
    assert len(descs) >= 3
    assert len(by["t2l"]) == len(by["random_description"]) == len(by["other_description"]) == 2
    for u in by["t2l"]:
        assert u.weights == {t: descs[t][u.slot] for t in descs}
    # (f): random letters of the stated length, one per description slot
    for u in by["random_description"]:
        for t, text in u.weights.items():
            assert len(text) == len(descs[t][u.slot]) and text != descs[t][u.slot]
            assert text == random_description(descs[t][u.slot], 0)
    # (g): the same adapter for every task, scored once (not once per description slot)
    (generic,) = by["generic_description"]
    assert set(generic.weights.values()) == {GENERIC_DESCRIPTION}
    # (d): never the task's own description, always one of another task's
    for u in by["other_description"]:
        for t, text in u.weights.items():
            assert text not in bench.descriptions(t)
            assert any(text in d for o, d in descs.items() if o != t)
    # the cache key holds the texts, so a control never reuses the t2l unit's cached scores
    assert by["random_description"][0].key != by["t2l"][0].key


def test_controls_need_a_run_and_other_description_needs_several_tasks():
    with pytest.raises(T2LError, match="random_description needs a trained run folder"):
        parse_adapters(["random_description"], have_run=False)
    runtime = SimpleNamespace(generator=_RecordingGenerator(), injection=None, device="cpu", base_model_name="m",
                              dtype="float32", chat_template=None, context=0, retarget=lambda targets: None)
    ev = Evaluator(runtime, parse_adapters(["other_description"], have_run=True), EvalSettings(), show_progress=False)
    (arc,) = get_benchmarks(["arc_easy"])
    examples = arc.examples(2, "chat")
    with pytest.raises(T2LError, match="other_description needs a benchmark of several tasks"):
        ev._units(arc, examples, {"arc_easy": arc.descriptions("arc_easy")[:1]})


def test_items_with_their_own_descriptions_get_one_unit_and_per_item_controls():
    """A run's held-out items (the end-of-training table, `t2l eval RUN --benchmarks sni_unseen`) are
    each asked with their own description: one unit per adapter, (c) from the item's description,
    (f) random letters of its length, (g) one text for all, (d) another task's description."""
    from t2l_framework.data.datamodule import EvalItem
    from t2l_framework.eval.benchmarks import RunSplit

    items = [EvalItem(f"t{i % 3}-{i // 3}", f"t{i % 3}", f"question {i}", ("x",), f"description {i} of t{i % 3}")
             for i in range(9)]
    bench = RunSplit("sni_unseen", items, max_new_tokens=4, max_prompt_tokens=0)
    runtime = SimpleNamespace(generator=_RecordingGenerator(), injection=None, device="cpu", base_model_name="m",
                              dtype="float32", chat_template=None, context=0, retarget=lambda targets: None)
    ev = Evaluator(runtime, parse_adapters(["t2l"] + CONTROLS, have_run=True), EvalSettings(n_descriptions=3, seed=7),
                   show_progress=False)
    examples = bench.examples(0, "chat")
    descs = {t: pick_descriptions(bench.descriptions(t), 3, 7, t) for t in dict.fromkeys(e.task for e in examples)}
    units = ev._units(bench, examples, descs)
    ev._attach_weights(units, examples)
    by = {u.adapter.name: u for u in units}
    assert len(units) == 4 == len(by)  # one description slot: the items' own
    assert [by["t2l"].weights[ex.id] for ex in examples] == [it.description for it in items]
    random_texts = [by["random_description"].weights[ex.id] for ex in examples]
    assert random_texts == [random_description(it.description, 7) for it in items]
    assert set(by["generic_description"].weights.values()) == {GENERIC_DESCRIPTION}
    for ex in examples:
        other = by["other_description"].weights[ex.id]
        assert other not in bench.descriptions(ex.task) and any(other in d for d in descs.values())
