"""The assembly layer: every command builds its base model + LoRA injection through the same
``assembly.loading.load_base``, the family is resolved once and handed to ``inject_lora``, and
``RunFolder`` alone names the paths of a run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from t2l_framework.assembly import loading
from t2l_framework.cli import main
from t2l_framework.errors import T2LError
from t2l_framework.run_folder import RunFolder, locate_hypernet
from tests.tiny_world import build_world


class _Built(T2LError):
    """Raised by the spy: the command got as far as building its base model."""


@pytest.fixture
def spy(monkeypatch):
    """Replaces ``assembly.loading.load_base`` and records (base_model, target_modules) per call."""
    calls = []

    def fake_load_base(base_cfg, target_modules, device=None, runs_on=None):
        calls.append((str(base_cfg.name_or_path), list(target_modules)))
        raise _Built("load_base reached")

    monkeypatch.setattr(loading, "load_base", fake_load_base)
    return calls


@pytest.fixture
def world(tmp_path):
    return build_world(tmp_path)


@pytest.fixture
def fake_run(monkeypatch, world, tmp_path):
    """A run whose adapter generator is a stand-in: generate and serve then go on to load_base."""
    from omegaconf import OmegaConf

    from t2l_framework.config import BaseModelConfig

    run = tmp_path / "runs" / "fake"
    (run / "hypernet").mkdir(parents=True)
    base_cfg = OmegaConf.structured(BaseModelConfig(name_or_path=str(world["llm"])))
    generator = SimpleNamespace(hypernet=SimpleNamespace(target_modules=["q_proj", "v_proj"]), base_config=base_cfg)
    seen = []

    def fake_generator(folder, device, trust_remote_code=False, *args, **kwargs):
        seen.append(str(folder))
        return generator

    monkeypatch.setattr(loading, "load_adapter_generator", fake_generator)
    return run, seen


def test_fit_builds_through_load_base(spy, world, capsys):
    assert main(["fit", str(world["recipe"]), "training.run_name=spied"]) == 1
    assert spy == [(str(world["llm"]), ["q_proj", "v_proj"])]
    assert "load_base reached" in capsys.readouterr().err
    assert RunFolder(world["root"] / "runs" / "spied").recipe.is_file()  # prepared before the model loads


def test_eval_builds_through_load_base(spy, world):
    assert main(["eval", str(world["recipe"]), "--benchmarks", "arc_easy", "--limit", "1", "--no-cache"]) == 1
    assert spy == [(str(world["llm"]), [])]  # base model only: adapters inject their own targets later


def test_generate_builds_through_load_base(spy, fake_run, world, tmp_path):
    run, seen = fake_run
    assert main(["generate", str(run), "a task", "-o", str(tmp_path / "out")]) == 1
    assert seen == [str(run)] and spy == [(str(world["llm"]), ["q_proj", "v_proj"])]


def test_serve_builds_through_load_base(spy, fake_run, world):
    pytest.importorskip("uvicorn")
    run, seen = fake_run
    assert main(["serve", str(run), "--port", "0"]) == 1
    assert seen == [str(run)] and spy == [(str(world["llm"]), ["q_proj", "v_proj"])]


def test_load_base_hands_the_resolved_family_to_inject_lora(monkeypatch, world):
    """The family that loaded the model is the one target discovery uses (no second lookup)."""
    from t2l_framework.config import BaseModelConfig
    from t2l_framework.llm.families import ModelFamily

    marker = ModelFamily("marked", ("llama",))
    monkeypatch.setattr(loading, "model_families", lambda: {"marked": marker})
    got = {}
    real_inject = loading.inject_lora

    def inject(model, targets, family=None):
        got["family"] = family
        return real_inject(model, targets, family)

    monkeypatch.setattr(loading, "inject_lora", inject)
    base, injection = loading.load_base(BaseModelConfig(name_or_path=str(world["llm"]), dtype="float32"), ["q_proj"], device="cpu")
    assert base.family is marker and got["family"] is marker
    assert injection.shapes.modules == ["q_proj"]


def test_run_folder_layout_and_locating_a_hypernet(tmp_path):
    run = RunFolder.for_recipe(SimpleNamespace(training=SimpleNamespace(run_name="", output_dir=str(tmp_path))),
                               tmp_path / "my_recipe.yaml")
    assert run.root == tmp_path / "my_recipe"
    assert (run.recipe.name, run.hypernet.name, run.adapter.name, run.checkpoints.name) == (
        "recipe.yaml", "hypernet", "adapter", "checkpoints")
    assert run.embedding_cache == tmp_path / ".embedding_cache"
    with pytest.raises(T2LError, match="no such folder"):
        locate_hypernet(run.root)
    run.hypernet.mkdir(parents=True)
    (run.hypernet / "hypernet_config.json").write_text("{}")
    assert locate_hypernet(run.root) == (run.hypernet, None)
    run.recipe.write_text("{}")
    assert locate_hypernet(run.hypernet) == (run.hypernet, run.recipe)
    lora = RunFolder(tmp_path / "lora")
    lora.adapter.mkdir(parents=True)
    (lora.adapter / "adapter_config.json").write_text("{}")
    lora.recipe.write_text("{}")
    assert lora.is_lora_run() and not lora.has_hypernet()
    with pytest.raises(T2LError, match="LoRA-baseline run"):
        locate_hypernet(lora.root)


class _WordCount:
    """A plugin benchmark with a metric of its own: the share of answers of at most two words."""

    def build(self, data_root=None):
        from t2l_framework.eval.benchmarks import Benchmark, Example

        class Brevity(Benchmark):
            name, kind, metric, version = "brevity", "short_answer", "brevity", "1"
            max_new_tokens = 3

            def load_examples(self):
                return [Example(f"b-{i}", f"Say something about {w}.", self.name, gold=None)
                        for i, w in enumerate(["rivers", "stones"])]

            def descriptions(self, task):
                return ["Answer in as few words as possible."]

            def grade(self, examples, answers, protocol, context=None):
                return [1.0 if len(a.split()) <= 2 else 0.0 for a in answers]

        return Brevity(data_root)


def test_a_plugin_benchmark_with_its_own_metric_runs_without_harness_changes(monkeypatch, world, tmp_path):
    from t2l_framework.assembly import get_benchmarks, runtime_for
    from t2l_framework.assembly import load_recipe
    from t2l_framework.eval.harness import EvalSettings, Evaluator, parse_adapters
    from t2l_framework.plugins import hookimpl, manager

    class Plugin:
        @staticmethod
        @hookimpl
        def t2l_register_benchmarks(register):
            register("brevity", _WordCount().build)

    class FakeEntryPoint:
        name, value, dist = "brevity-plugin", f"{__name__}:Plugin", None

        def load(self):
            return Plugin

    monkeypatch.setattr(manager, "_entry_points", lambda: [FakeEntryPoint()])
    monkeypatch.setattr(manager, "_REGISTRY", None)
    try:
        (bench,) = get_benchmarks(["brevity"])
        cfg = load_recipe(world["recipe"], check_files=False)
        runtime = runtime_for(cfg.base_model, "cpu", "float32")
        evaluator = Evaluator(runtime, parse_adapters(["base", "base+description"], have_run=False),
                              EvalSettings(protocol="chat", batch_size=2), show_progress=False)
        results, predictions = evaluator.run([bench])
    finally:
        manager.registry(reload=True)
    assert results["benchmarks"]["brevity"]["metric"] == "brevity"
    for name in ("base", "base+description"):
        rows = [p for p in predictions if p["adapter"] == name]
        expected = sum(1.0 if len(p["prediction"].split()) <= 2 else 0.0 for p in rows) / len(rows)
        assert results["scores"][name]["brevity"]["score"] == pytest.approx(expected)


def test_code_benchmarks_grade_themselves_in_the_sandbox():
    """HumanEval's own grade() runs each answer as a program (no harness branch for code)."""
    from t2l_framework.eval.benchmarks import GradeContext, Graded, HumanEval

    bench = HumanEval()
    (ex,) = bench.examples(1, "chat")
    right = ("```python\n    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
             "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n```")
    wrong = "```python\n    return False\n```"
    done = []
    graded = bench.grade([ex, ex], [right, wrong], "chat", GradeContext(code_timeout_s=20, progress=done.append))
    assert isinstance(graded, Graded) and bench.runs_programs
    assert graded.scores == [1.0, 0.0], graded.details
    assert len(graded.details["status"]) == 2 and done and done[-1] == 2
