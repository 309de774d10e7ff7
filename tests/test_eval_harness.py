"""The evaluation machinery: benchmarks from the vendored data, batched option log-likelihoods
with mixed adapters, weight conforming, description picking, adapter parsing and the cache."""

from __future__ import annotations

import json

import pytest
import torch

from t2l_framework.errors import T2LError
from t2l_framework.assembly import get_benchmarks
from t2l_framework.eval.benchmarks import PAPER_BENCHMARKS
from t2l_framework.eval.cache import ResultCache
from t2l_framework.eval.harness import parse_adapters, pick_descriptions
from t2l_framework.eval.loglik import OptionsRow, option_logprobs, sequence_count
from t2l_framework.lora.batched import inject_lora
from t2l_framework.lora.weights import LoraWeights, stack_rows
from tests.test_lora import TARGETS, random_weights


def _reference_logprob(model, context: list[int], option: list[int]) -> float:
    """Sum of log p(option | context) from a plain full-vocabulary forward of one sequence."""
    ids = torch.tensor([context + option])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logp[len(context) - 1 + i, tok] for i, tok in enumerate(option)))


def test_option_logprobs_match_a_plain_forward(tiny_llama):
    model = tiny_llama()
    injection = inject_lora(model, TARGETS)
    rows = [OptionsRow([5, 6, 7, 8], [[10], [11], [12]]),           # single-token options: one forward row
            OptionsRow([9, 3], [[20, 21, 22], [23], [24, 25]]),       # multi-token: one forward row per option
            OptionsRow([4, 4, 4, 4, 4, 4, 4], [[30, 31], [32, 33]])]
    assert sequence_count(rows) == 1 + 3 + 2
    got = option_logprobs(model, injection, rows, batch_size=2)
    for row, scores in zip(rows, got):
        for option, score in zip(row.options, scores):
            assert score == pytest.approx(_reference_logprob(model, row.context, option), abs=1e-4)


def test_mixed_adapters_in_one_batch_equal_one_adapter_at_a_time(tiny_llama):
    model = tiny_llama()
    injection = inject_lora(model, TARGETS)
    w = random_weights(injection.shapes, batch=3, scale=0.6)
    adapters = [None, w.select(0), w.select(1), w.select(2)]
    contexts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
    options = [[40, 41], [42]]
    mixed = option_logprobs(model, injection, [OptionsRow(c, options, a) for c in contexts for a in adapters],
                            batch_size=16)
    alone = []
    for c in contexts:
        for a in adapters:
            alone += option_logprobs(model, injection, [OptionsRow(c, options, a)], batch_size=1)
    assert torch.allclose(torch.tensor(mixed), torch.tensor(alone), atol=1e-4)
    # and the adapters matter: a LoRA row differs from the base row of the same context
    assert abs(mixed[1][0] - mixed[0][0]) > 1e-3


def test_conform_pads_rank_and_folds_scaling_without_changing_outputs(tiny_llama):
    model = tiny_llama()
    injection = inject_lora(model, TARGETS)
    small = random_weights(injection.shapes, batch=1, rank=2, alpha=7.0, scale=0.6)
    only_q = LoraWeights({"q_proj": small.A["q_proj"]}, {"q_proj": small.B["q_proj"]}, 2, 7.0)
    x = torch.tensor([[3, 4, 5, 6, 7]])
    for weights in (small, only_q):
        padded = weights.conform(injection.shapes, rank=6)
        assert padded.rank == 6 and padded.scaling == 1.0 and set(padded.modules) == set(TARGETS)
        with torch.no_grad():
            injection.set(None)
            with injection.use(padded):
                got = model(x).logits
            reference = LoraWeights({m: weights.A.get(m, torch.zeros_like(small.A[m])) for m in TARGETS},
                                    {m: weights.B.get(m, torch.zeros_like(small.B[m])) for m in TARGETS}, 2, 7.0)
            with injection.use(reference):
                want = model(x).logits
        assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(T2LError, match="does not fit"):
        small.conform(injection.shapes, rank=1)


def test_stack_rows_shares_one_adapter_and_zero_fills_base_rows(tiny_llama):
    injection = inject_lora(tiny_llama(), TARGETS)
    w = random_weights(injection.shapes, batch=2)
    one = w.select(0)
    assert stack_rows([None, None]) is None
    assert stack_rows([one, one, one]) is one
    mixed = stack_rows([one, None, w.select(1)])
    assert mixed.batch_size == 3 and float(mixed.B["q_proj"][1].abs().sum()) == 0.0
    assert torch.equal(mixed.A["q_proj"][2], w.A["q_proj"][1])


def test_builtin_benchmarks_load_from_the_vendored_data():
    benches = {b.name: b for b in get_benchmarks(["all"])}
    assert set(PAPER_BENCHMARKS) <= set(benches) and "sni_unseen" in benches
    sizes = {"arc_challenge": 1172, "arc_easy": 2376, "boolq": 3270, "gsm8k": 1319, "hellaswag": 10042,
             "openbookqa": 500, "piqa": 1838, "winogrande": 1267, "humaneval": 164, "mbpp": 257}
    for name, size in sizes.items():
        bench = benches[name]
        assert len(bench.examples()) == size, name
        assert len(bench.examples(3)) == 3
        assert len(bench.descriptions(bench.examples(1)[0].task)) == 200
    arc = benches["arc_easy"].examples()
    three = next(e for e in arc if len(e.labels) == 3)  # the template lists 4 options; this item has 3
    assert "\nC: " in three.prompt and "\nD: " not in three.prompt
    five = [e for e in benches["arc_challenge"].examples() if len(e.labels) == 5]
    assert five and "\nE: " in five[0].prompt
    assert benches["gsm8k"].prefill.startswith("Let's think")
    assert benches["humaneval"].prefill == "```python\n"
    sni = benches["sni_unseen"].examples(8)
    assert len({e.task for e in sni}) == 4  # round-robin over the held-out tasks
    assert len(benches["sni_unseen"].descriptions(sni[0].task)) == 3


def test_unknown_benchmark_is_one_clear_error():
    with pytest.raises(T2LError, match="unknown benchmark 'arc_chalenge'.*did you mean 'arc_challenge'"):
        get_benchmarks(["arc_chalenge"])


def test_pick_descriptions_is_seeded_and_distinct():
    descs = [f"description {i}" for i in range(50)]
    a = pick_descriptions(descs, 3, 0, "arc_easy")
    assert a == pick_descriptions(descs, 3, 0, "arc_easy") and len(set(a)) == 3
    assert a != pick_descriptions(descs, 3, 1, "arc_easy")
    assert pick_descriptions(descs[:2], 3, 0, "x") == descs[:2]


def test_parse_adapters(tmp_path):
    peft = tmp_path / "mt" / "adapter"
    peft.mkdir(parents=True)
    (peft / "adapter_config.json").write_text("{}")
    specs = parse_adapters(["base", "base+description", "t2l", f"oracle={peft}", str(tmp_path / "mt")], have_run=True)
    assert [(s.name, s.kind) for s in specs] == [("base", "base"), ("base+description", "description"),
                                                 ("t2l", "t2l"), ("oracle", "peft"), ("mt", "peft")]
    with pytest.raises(T2LError, match="needs a trained run folder"):
        parse_adapters(["t2l"], have_run=False)
    with pytest.raises(T2LError, match="does not exist"):
        parse_adapters(["runs/nope"], have_run=True)
    with pytest.raises(T2LError, match="appear twice"):
        parse_adapters([f"x={peft}", f"x={peft}"], have_run=True)


def test_result_cache_round_trip_and_misses(tmp_path):
    cache = ResultCache(tmp_path)
    key = {"model": "m", "adapter": "a", "benchmark": "b", "items": ["1", "2"]}
    assert cache.get(key) is None
    cache.put(key, {"scores": [1.0, 0.0]})
    assert cache.get(dict(key)) == {"scores": [1.0, 0.0]}
    assert cache.get(dict(key, adapter="other")) is None
    assert (cache.hits, cache.misses) == (1, 2)
    (entry,) = tmp_path.glob("*.json")
    data = json.loads(entry.read_text())
    data["key"]["model"] = "edited"
    entry.write_text(json.dumps(data))
    assert cache.get(key) is None  # a file whose key does not match is not trusted
    assert ResultCache(None).get(key) is None


def test_greedy_decode_drops_finished_rows_and_matches_one_row_at_a_time(tiny_llama):
    from t2l_framework.runtime.greedy import greedy_decode

    model = tiny_llama()
    injection = inject_lora(model, TARGETS)
    w = random_weights(injection.shapes, batch=2, scale=0.6)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
    rows = [None, w.select(0), w.select(1), None]

    def alone(i: int, eos: list[int]) -> list[int]:
        ids = torch.tensor([prompts[i]])
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos or None)
        with torch.no_grad(), (injection.use(rows[i]) if rows[i] is not None else torch.no_grad()):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()
        return [t for t in out[:next((k for k, t in enumerate(out) if t in eos), len(out))]]

    free = [alone(i, []) for i in range(4)]
    assert free != [free[0]] * 4
    # EOS tokens chosen so that rows stop at different steps (and one row never stops)
    eos = sorted({free[0][1], free[2][4]} - set(free[3]))
    expected = [f[:next((k for k, t in enumerate(f) if t in eos), len(f))] for f in free]
    assert len({len(e) for e in expected}) >= 2
    got = greedy_decode(model, prompts, rows, injection, max_new_tokens=8, eos_ids=eos, pad_id=0)
    assert got == expected
    # stop texts end a row too, and stay in its answer (a code block's closing fence)
    class Letters:
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    stop_char = Letters().decode([free[1][2]])
    cut = [f[:next((k + 1 for k, t in enumerate(f) if Letters().decode([t]) == stop_char), len(f))] for f in free]
    got = greedy_decode(model, prompts, rows, injection, max_new_tokens=8, pad_id=0, stop=[stop_char],
                        tokenizer=Letters())
    assert got == cut and len(got[1]) == 3


def test_recipe_eval_benchmarks_are_checked_against_the_registry(tmp_path):
    from t2l_framework.assembly import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  benchmarks: [paper, sni_unseen, hellaswg]\n")
    with pytest.raises(T2LError, match="eval.benchmarks: unknown benchmark 'hellaswg'.*did you mean 'hellaswag'"):
        load_recipe(recipe)
    recipe.write_text("eval:\n  benchmarks: [paper, sni_unseen, hellaswag]\n")
    assert list(load_recipe(recipe).eval.benchmarks) == ["paper", "sni_unseen", "hellaswag"]


def test_aggregate_clusters_multi_task_items_and_pairs_adapters_with_base():
    """SEs and paired differences are clustered by task when items span tasks, plain otherwise;
    extra metrics (acc_norm) get their own mean, SE and difference."""
    from t2l_framework.eval.benchmarks import Example
    from t2l_framework.eval.harness import AdapterSpec, Evaluator, _Unit
    from t2l_framework.eval.stats import clustered_mean_se, mean_se, paired_difference

    ev = object.__new__(Evaluator)
    ev.adapters = [AdapterSpec("base", "base"), AdapterSpec("t2l", "t2l")]
    units = [_Unit(ev.adapters[0], 0, {}), _Unit(ev.adapters[1], 0, {}), _Unit(ev.adapters[1], 1, {})]
    base = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    slots = [[1.0, 1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]]
    t2l = [(a + b) / 2 for a, b in zip(*slots)]
    norm = [[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]] * 3

    def done(scores, extra):
        return {"scores": scores, "predictions": [None] * 6, "cached": False, "extra": {"acc_norm": extra}}

    results = {0: done(base, norm[0]), 1: done(slots[0], norm[1]), 2: done(slots[1], norm[2])}
    bench = type("B", (), {"name": "b", "metric": "acc"})()
    for tasks in (["a", "a", "b", "b", "c", "c"], ["x"] * 6):
        examples = [Example(str(i), "", t, 0) for i, t in enumerate(tasks)]
        out = ev._aggregate(bench, examples, units, results)
        clusters = tasks if len(set(tasks)) > 1 else None
        assert out["clustered"] is (clusters is not None)
        want_se = clustered_mean_se(base, tasks)[1] if clusters else mean_se(base)[1]
        assert out["scores"]["base"]["se"] == pytest.approx(want_se)
        diff, se = paired_difference(t2l, base, clusters)
        assert out["scores"]["t2l"]["vs_base"] == pytest.approx({"diff": diff, "se": se})
        assert out["scores"]["t2l"]["metrics"]["acc_norm"]["vs_base"] == pytest.approx({"diff": 0.0, "se": 0.0})
        assert "vs_base" not in out["scores"]["base"]
    assert clustered_mean_se(base, ["a", "a", "b", "b", "c", "c"])[1] != pytest.approx(mean_se(base)[1])


def test_answer_logprob_is_the_mean_token_logprob_of_the_best_reference_with_eos(tiny_llama):
    """Per (adapter, item) row: log p(reference + EOS | prompt) / its tokens, best over the references,
    with the row's own LoRA; the references tokenized alone, as training encodes answers."""
    from types import SimpleNamespace

    from t2l_framework.eval.benchmarks import Example
    from t2l_framework.eval.harness import EvalSettings, Evaluator
    from tests.tiny_world import word_tokenizer

    tok = word_tokenizer(["alpha beta gamma delta epsilon zeta eta theta"])
    model = tiny_llama()
    injection = inject_lora(model, TARGETS)
    w = random_weights(injection.shapes, batch=1, scale=0.6).select(0)
    ev = Evaluator.__new__(Evaluator)
    ev.runtime = SimpleNamespace(tokenizer=tok, model=model, injection=injection, pad_id=tok.pad_token_id)
    ev.settings, ev.show_progress = EvalSettings(batch_size=2), False
    examples = [Example("i0", "p", "t", gold=["alpha beta", "gamma"]), Example("i1", "p", "t", gold=["delta"])]
    prompts = [[3, 4, 5], [6, 7]]
    rows = [(prompts[0], None), (prompts[1], None), (prompts[0], w), (prompts[1], w)]  # 2 units x 2 items
    got = ev._answer_logprobs(SimpleNamespace(name="b"), [p for p, _ in rows], [a for _, a in rows], examples)
    eos = tok.eos_token_id

    def expected(prompt, refs, weights):
        from contextlib import nullcontext
        best = []
        for ref in refs:
            option = tok(ref, add_special_tokens=False)["input_ids"] + [eos]
            with injection.use(stack_rows([weights])) if weights is not None else nullcontext():
                best.append(_reference_logprob(model, prompt, option) / len(option))
        return max(best)

    want = [expected(p, ex.gold, a) for (p, a), ex in zip(rows, examples * 2)]
    assert got == pytest.approx(want, abs=1e-4)
    first_only = [expected(p, ex.gold[:1], a) for (p, a), ex in zip(rows, examples * 2)]
    assert first_only != pytest.approx(want, abs=1e-4)  # the best reference is not always the first
    assert abs(got[2] - got[0]) > 1e-3  # the adapter changes it
