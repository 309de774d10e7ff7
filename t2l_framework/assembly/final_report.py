"""The table `t2l fit` prints at the end: held-out SNI items under each adaptation condition.

It is the evaluation pipeline of ``t2l eval RUN --benchmarks sni_seen,sni_unseen`` (``assembly.evaluate``:
the run's own splits, ``eval.harness.Evaluator``, its greedy decoder) run on the trained pieces
still in memory; ``eval.sni_report`` scores the answers and writes report.md / report.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from t2l_framework.assembly.evaluate import RUN_SPLITS, run_split_benchmarks
from t2l_framework.config import resolve_path
from t2l_framework.console import say
from t2l_framework.eval.cache import ResultCache
from t2l_framework.eval.harness import AdapterSpec, EvalSettings, Evaluator
from t2l_framework.eval.sni_report import T2L_CONDITIONS, score_predictions, write_report
from t2l_framework.run_folder import RunFolder
from t2l_framework.runtime.adapters import AdapterGenerator
from t2l_framework.runtime.loaded import T2LRuntime
from t2l_framework.training.modes import Trainable, mode_for
from t2l_framework.training.training_status import TrainingStatus


def training_column(cfg, run_dir: Path, baseline_dir: Path | None) -> dict[str, str]:
    """condition -> how its run trained (steps, examples, wall time, or 'cut short at step N of M').

    (c) and (d) come from this run; (e) from the run folder that holds the baseline adapter
    (a multi-task LoRA trained by ``t2l fit`` records its steps there). A baseline trained with
    different work than this run is flagged: the comparison is meant to be by equal work.
    """
    own = TrainingStatus.load(run_dir)
    if mode_for(cfg).trains is Trainable.ONE_LORA:  # the run's LoRA is the table's baseline
        return {"mt_lora": own.describe()} if own else {}
    column = {name: own.describe() for name in T2L_CONDITIONS} if own else {}
    if baseline_dir is not None:
        other = TrainingStatus.load(baseline_dir)
        if other is None:
            column["mt_lora"] = f"unknown (no {RunFolder(baseline_dir).status.name} in {baseline_dir})"
        else:
            column["mt_lora"] = other.describe()
            if own and (other.steps, other.examples) != (own.steps, own.examples):
                column["mt_lora"] += (f"; not the same work as T2L ({own.steps} step{'s' * (own.steps != 1)}, "
                                      f"{own.examples:,} examples)")
    return column


def table_adapters(cfg, run: RunFolder, recipe_file: Path | None,
                   n_tasks: int) -> tuple[list[AdapterSpec], Path | None]:
    """The table's conditions as harness adapters, in its order (a)-(h), and the folder of the
    baseline adapter's run (None without one). (d) needs a split of several tasks."""
    specs = [AdapterSpec("base", "base"), AdapterSpec("base+description", "description")]
    trains = mode_for(cfg).trains
    if trains is Trainable.HYPERNETWORK:
        specs.append(AdapterSpec("t2l", "t2l"))
        if n_tasks > 1:
            specs.append(AdapterSpec("t2l_other_task_description", "t2l", control="other_description"))
    baseline_dir = None
    if trains is Trainable.ONE_LORA:
        specs.append(AdapterSpec("mt_lora", "peft", run.adapter))  # the adapter this run just saved
    elif cfg.eval.baseline_adapter:
        path = resolve_path(cfg.eval.baseline_adapter, recipe_file)
        if path.exists():
            specs.append(AdapterSpec("mt_lora", "peft", path))
            baseline_dir = path.parent
        else:
            say(f"eval.baseline_adapter {path} not found; the table leaves out (e). "
                "Train it with the multi-task LoRA recipe first.")
    if trains is Trainable.HYPERNETWORK:
        specs += [AdapterSpec("t2l_random_description", "t2l", control="random_description"),
                  AdapterSpec("t2l_generic_description", "t2l", control="generic_description")]
    if cfg.eval.arrow_library:
        path = resolve_path(cfg.eval.arrow_library, recipe_file)
        if path.is_dir():
            specs.append(AdapterSpec("arrow", "arrow", path))
        else:
            say(f"eval.arrow_library {path} not found; the table leaves out (h).")
    return specs, baseline_dir


def pieces_runtime(cfg, run: RunFolder, pieces) -> T2LRuntime:
    """A ``T2LRuntime`` over the trained ``pieces`` in memory: the base model and injection training
    used, and (sft) the hypernetwork with its encoder, as ``t2l eval RUN`` would load them."""
    base = pieces.base
    generator = None
    if pieces.mode.trains is Trainable.HYPERNETWORK:
        device = next(base.model.parameters()).device
        hypernet = pieces.trainable.to(device).eval()
        generator = AdapterGenerator(hypernet, pieces.encoder, name=run.name, base_config=cfg.base_model,
                                     chat_template=bool(cfg.base_model.chat_template))
    return T2LRuntime(base, pieces.injection, generator, bool(cfg.base_model.chat_template), base.dtype.name)


def final_report(cfg, run: RunFolder, pieces, recipe_file: Path | None = None,
                 seconds: dict[str, float] | None = None) -> str:
    """Score base / base+description / T2L / the description controls / baseline LoRA / Arrow with
    the trained ``pieces`` (``RunPieces``) on the run's own splits and write ``report.md`` +
    ``report.json`` into the run folder; returns the Markdown. seconds (part -> wall seconds, e.g.
    training) receives one entry per table and goes into report.json with them."""
    runtime = pieces_runtime(cfg, run, pieces)
    seconds = {} if seconds is None else seconds
    # the settings `t2l eval RUN` takes from the recipe, so that it reproduces the table's numbers
    settings = EvalSettings(limit=int(cfg.eval.report_max_items), batch_size=int(cfg.eval.batch_size),
                            n_descriptions=int(cfg.eval.n_descriptions),
                            answer_loglik=bool(cfg.eval.answer_loglik))
    tables, items, baseline_dir = {}, {}, None
    for name, bench in run_split_benchmarks(cfg, pieces.datamodule).items():
        title = RUN_SPLITS[name][1]
        examples = bench.examples(settings.limit)
        if not examples:
            continue
        specs, baseline_dir = table_adapters(cfg, run, recipe_file, len({ex.task for ex in examples}))
        say(f"evaluating {len(examples)} items: {title}")
        start = time.perf_counter()
        evaluator = Evaluator(runtime, specs, settings, ResultCache(None))
        tables[title] = score_predictions(evaluator.run_benchmark(bench), examples)
        items[title] = [{"task": ex.task, "answers": list(ex.gold)} for ex in examples]
        seconds[f"table: {title} ({len(examples)} items x {len(tables[title])} conditions)"] = \
            time.perf_counter() - start
    md = write_report(run.root, tables, items, training_column(cfg, run.root, baseline_dir), seconds)
    print(md)
    return md
