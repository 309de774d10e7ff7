"""``t2l eval`` as a function, and the one evaluation pipeline behind it and the end-of-training table.

``evaluate(run_or_recipe, benchmarks, adapters, ...)`` does what ``t2l eval`` does: it resolves a run
folder, hypernet folder, hub id or recipe, picks the default adapters (base, base+description,
t2l, the recipe's baseline and Arrow library), loads the runtime and scores with
``eval.harness.Evaluator``. On a run, ``sni_unseen`` and ``sni_seen`` are the run's own held-out
items (``run_split_benchmarks``), the items the end-of-training table (``final_report``) scores
with the same harness, so the two give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Sequence

from t2l_framework.config import EvalConfig, comma_list, find_recipe, resolve_path
from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.eval.benchmarks import Benchmark, RunSplit
from t2l_framework.lora.arrow import ARROW_TEMPERATURE, ARROW_TOP_K
from t2l_framework.run_folder import RunFolder

# The run's own splits, by benchmark name, with the titles the end-of-training table gives them.
RUN_SPLITS = {"sni_seen": ("seen", "Training tasks, held-out instances and descriptions"),
              "sni_unseen": ("unseen", "Tasks never seen in training")}


@dataclass
class Evaluation:
    """What ``evaluate`` returns: results (``Evaluator.run``'s, as results.json holds them), the
    per-item predictions and the files written (kind -> path)."""

    results: dict
    predictions: list[dict]
    files: dict[str, Path]


def per_task(items: list, n: int) -> list:
    """The first ``n`` items of each task, order kept: the in-distribution split can be smaller
    than the unseen one, whose size is what the zero-shot claim rests on."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        seen[it.task] = seen.get(it.task, 0) + 1
        if seen[it.task] <= n:
            out.append(it)
    return out


def run_split_benchmarks(cfg, datamodule) -> dict[str, RunSplit]:
    """``sni_seen`` and ``sni_unseen`` of a run: its data module's held-out items (``eval_items``),
    the seen split cut to ``eval.report_seen_per_task`` per task, prompts and answers as the run's
    recipe sets them."""
    out = {}
    for name, (split, _) in RUN_SPLITS.items():
        items = datamodule.eval_items(split)
        if split == "seen" and int(cfg.eval.report_seen_per_task):
            items = per_task(items, int(cfg.eval.report_seen_per_task))
        out[name] = RunSplit(name, items, int(cfg.eval.max_new_tokens), int(cfg.data.max_prompt_tokens),
                             str(cfg.data.system_prompt))
    return out


def has_run_splits(cfg) -> bool:
    """Whether a recipe trains on held-out SNI splits of its own (a ``T2LDataModule``)."""
    from t2l_framework.training.modes import Trainable, mode_class

    if cfg is None:
        return False
    mode = mode_class(str(cfg.training.mode))
    return mode.reads_instances and mode.trains in (Trainable.HYPERNETWORK, Trainable.ONE_LORA)


def _recipe_splits(cfg, recipe_file: Path | None) -> dict[str, RunSplit]:
    from t2l_framework.data.datamodule import T2LDataModule

    return run_split_benchmarks(cfg, T2LDataModule(cfg.data, None, None, int(cfg.training.seed), recipe_file))


def pick_benchmarks(names: Sequence[str], data_root: str | Path | None, cfg=None,
                    recipe_file: Path | None = None) -> list[Benchmark]:
    """Benchmarks by name ('paper', 'all' expand); with a run's ``cfg``, ``sni_unseen`` and ``sni_seen``
    are its own splits (``run_split_benchmarks``)."""
    from t2l_framework.assembly.lookups import get_benchmarks

    splits = cache(lambda: _recipe_splits(cfg, recipe_file)) if has_run_splits(cfg) else None
    out: dict[str, Benchmark] = {}
    for name in names:
        if name in RUN_SPLITS and splits is not None:
            out.setdefault(name, splits()[name])
            continue
        if name == "sni_seen":
            raise T2LError("--benchmarks sni_seen is a run's held-out items of its training tasks: it needs a "
                           "trained run folder (with its recipe.yaml) as RUN_OR_RECIPE")
        for bench in get_benchmarks([name], data_root):
            out.setdefault(bench.name, splits()[bench.name] if splits and bench.name in RUN_SPLITS else bench)
    return list(out.values())


def build_evaluator(run_or_recipe: str | Path, benchmarks: Sequence[str] | str | None = None,
                    adapters: Sequence[str] | str | None = None, *, revision: str | None = None,
                    limit: int | None = None, n_descriptions: int | None = None, protocol: str | None = None,
                    scoring: str = "loglik", mc_answer: str = "label", batch_size: int | None = None,
                    max_new_tokens: int | None = None,
                    code_timeout_s: float = 10.0, seed: int = 0, arrow_top_k: int = ARROW_TOP_K,
                    arrow_temperature: float = ARROW_TEMPERATURE, answer_loglik: bool | None = None,
                    output: str | Path | None = None,
                    cache_dir: str | Path | None = None, use_cache: bool = True, data_root: str | Path | None = None,
                    device: str | None = None, dtype: str | None = "auto", trust_remote_code: bool = False,
                    show_progress: bool = True) -> tuple:
    """(``Evaluator``, the benchmarks, the output folder) for scoring adapters on benchmarks: the run,
    recipe or hub id resolved, the default adapters picked, the runtime loaded (``evaluate`` then runs it).

    run_or_recipe: a trained run folder, a hypernet folder, a hub id (``ORG/NAME`` at ``revision``)
    or a recipe (its base model only). benchmarks / adapters: names as ``t2l eval --benchmarks`` /
    ``--adapters`` take them (a list, or one comma-separated string); None: the recipe's
    ``eval.benchmarks`` (else ``paper``) / base, base+description, t2l (a T2L run), the run's own
    adapter (a LoRA run), the recipe's ``eval.baseline_adapter`` and ``eval.arrow_library``.
    limit, n_descriptions, protocol, batch_size, answer_loglik: None takes the recipe's ``eval`` value (limit 0: all
    items). max_new_tokens: None = each benchmark's own answer length (a run's own sni_seen /
    sni_unseen: its recipe's ``eval.max_new_tokens``), else a cap for all.
    output: default RUN/eval, or eval_results/RECIPE. dtype: 'auto', a dtype name, or None (the
    recipe's ``base_model.dtype``). The other settings are ``EvalSettings``'.
    """
    from t2l_framework.assembly.hub import is_hub_id, resolve_run
    from t2l_framework.assembly.loading import check_run_trust, default_device, load_adapter_generator, runtime_for
    from t2l_framework.assembly.lookups import load_recipe
    from t2l_framework.eval.cache import ResultCache, default_cache_dir
    from t2l_framework.eval.harness import EvalSettings, Evaluator, parse_adapters

    target = Path(run_or_recipe).expanduser()
    looks_like_recipe = target.suffix in (".yaml", ".yml")
    if revision or (not target.exists() and not looks_like_recipe and is_hub_id(str(run_or_recipe))):
        target = resolve_run(str(run_or_recipe), revision)
    run = RunFolder(target)
    own_adapter: list[str] = []
    if target.is_dir() and run.is_lora_run():
        recipe_file = run.recipe  # a LoRA-baseline run: its base model, and its adapter by default
        cfg, default_out = load_recipe(recipe_file, check_files=False, untrusted=not trust_remote_code), run.eval_dir
        check_run_trust(cfg, recipe_file, trust_remote_code)
        own_adapter = [f"{run.name}={run.adapter}"]
    elif target.is_dir():  # a trained T2L run (or hypernet) folder; loaded once the arguments are checked
        recipe_file = run.recipe if run.has_recipe() else None
        cfg = load_recipe(recipe_file, check_files=False, untrusted=not trust_remote_code) if recipe_file else None
        default_out = run.eval_dir
    else:
        recipe_file = find_recipe(str(run_or_recipe))
        cfg, default_out = load_recipe(recipe_file), Path("eval_results") / recipe_file.stem
    is_t2l_run = target.is_dir() and not own_adapter
    ev = cfg.eval if cfg is not None else EvalConfig()  # the defaults live in EvalConfig only
    wanted = comma_list(adapters)
    names = wanted or (["base", "base+description"] + (["t2l"] if is_t2l_run else []) + own_adapter)
    if not wanted and not own_adapter and ev.baseline_adapter:
        baseline = resolve_path(ev.baseline_adapter, recipe_file)
        if baseline.is_dir():
            names.append(str(baseline))
        else:
            say(f"eval.baseline_adapter {ev.baseline_adapter} does not exist; evaluating without it")
    if ev.arrow_library and (not wanted or "arrow" in names):
        library = resolve_path(ev.arrow_library, recipe_file)
        if "arrow" in names:  # the recipe's library
            names[names.index("arrow")] = f"arrow={library}"
        elif library.is_dir():
            names.append(f"arrow={library}")
        else:
            say(f"eval.arrow_library {ev.arrow_library} does not exist; evaluating without Arrow")
    specs = parse_adapters(names, have_run=is_t2l_run)
    run_cfg = cfg if target.is_dir() else None  # a run's own splits; a recipe alone scores the bundle's
    benches = pick_benchmarks(comma_list(benchmarks) or list(ev.benchmarks) or ["paper"], data_root, run_cfg,
                              recipe_file)
    settings = EvalSettings(
        limit=limit if limit is not None else ev.limit,
        n_descriptions=n_descriptions if n_descriptions is not None else ev.n_descriptions,
        scoring=scoring, mc_answer=mc_answer, protocol=protocol or ev.protocol,
        batch_size=batch_size if batch_size is not None else ev.batch_size,
        max_new_tokens=max_new_tokens or 0, code_timeout_s=code_timeout_s,
        seed=seed, arrow_top_k=arrow_top_k, arrow_temperature=arrow_temperature,
        answer_loglik=answer_loglik if answer_loglik is not None else bool(ev.answer_loglik))
    device = device or default_device()
    generator = None
    if is_t2l_run:
        generator = load_adapter_generator(target, device, trust_remote_code=trust_remote_code)
        base_cfg = generator.base_config
    else:
        base_cfg = cfg.base_model
    say(f"loading {base_cfg.name_or_path} ...")
    runtime = runtime_for(base_cfg, device, dtype, generator)
    cache_folder = (cache_dir or default_cache_dir()) if use_cache else None
    evaluator = Evaluator(runtime, specs, settings, ResultCache(cache_folder), show_progress=show_progress,
                          load_generator=load_adapter_generator)
    return evaluator, benches, Path(output) if output else default_out


def evaluate(run_or_recipe: str | Path, benchmarks: Sequence[str] | str | None = None,
             adapters: Sequence[str] | str | None = None, **settings) -> Evaluation:
    """Score adapters on benchmarks and write results.json / results.md / results.png / predictions.jsonl
    (``t2l eval``); the arguments are ``build_evaluator``'s."""
    from t2l_framework.eval.report import write_outputs

    evaluator, benches, out = build_evaluator(run_or_recipe, benchmarks, adapters, **settings)
    say(f"evaluating {', '.join(a.name for a in evaluator.adapters)} on {', '.join(b.name for b in benches)}"
        f" ({'all' if not evaluator.settings.limit else evaluator.settings.limit} items each)")
    results, predictions = evaluator.run(benches)
    files = write_outputs(results, predictions, out)
    return Evaluation(results, predictions, files)


def answer_likelihoods(run: str | Path, benchmarks: Sequence[str], adapters: Sequence[str],
                       **settings) -> dict[str, dict]:
    """{benchmark: {"tasks": task per item, adapter: ``answer_logprob`` per item}} without generating
    (``Evaluator.answer_likelihood``): how each adapter scores the items' reference answers, in a
    fraction of a full evaluation's time. ``settings``: ``evaluate``'s keyword arguments."""
    evaluator, benches, _ = build_evaluator(run, benchmarks, adapters, **settings)
    return _likelihoods(evaluator, benches)


def _likelihoods(evaluator, benches) -> dict[str, dict]:
    out = {}
    for bench in benches:
        tasks, values = evaluator.answer_likelihood(bench)
        out[bench.name] = {"tasks": tasks, **values}
    return out


def likelihood_check(run: str | Path, benchmarks: Sequence[str], adapters: Sequence[str],
                     output: str | Path | None = None, **settings) -> tuple[str, dict[str, Path]]:
    """``t2l eval --likelihood-only``: ``answer_likelihoods`` as a table per benchmark, paired against
    ``t2l`` (else the first adapter); writes likelihood.json and likelihood.md. Returns (Markdown, files)."""
    import json

    from t2l_framework.atomic import atomic_file
    from t2l_framework.eval.report import likelihood_table

    evaluator, benches, out = build_evaluator(run, benchmarks, adapters, output=output, **settings)
    names = [a.name for a in evaluator.adapters]
    reference = "t2l" if "t2l" in names else names[0]
    payload = _likelihoods(evaluator, benches)
    md = "\n".join(likelihood_table(name, p["tasks"], {a: v for a, v in p.items() if a != "tasks"}, reference)
                   for name, p in payload.items())
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "likelihood.json", "table": out / "likelihood.md"}
    with atomic_file(files["json"]) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    with atomic_file(files["table"]) as tmp:
        tmp.write_text(md)
    return md, files
