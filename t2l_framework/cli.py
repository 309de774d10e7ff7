"""The `t2l` command: validate, recipes, plugins, fit, eval, generate, serve, import-reference, push, inspect, data.

Each sub-command is a small ``cmd_*`` function; ``main`` turns what it ends with into the exit
status of ``EXIT_CODES`` (also shown by ``t2l --help``): a ``T2LError`` (bad input) is one line
without a traceback, any other exception is a bug (its traceback and a request to report it);
both exit 1. ``--debug`` shows the traceback of a ``T2LError`` too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path

from t2l_framework.config import comma_list
from t2l_framework.console import say
from t2l_framework.errors import T2LError, did_you_mean
from t2l_framework.eval.protocols import DEFAULT_PROTOCOL, PROTOCOL_HELP, PROTOCOLS
from t2l_framework.lora.arrow import ARROW_TEMPERATURE, ARROW_TOP_K
from t2l_framework.llm.dtype import DTYPE_CHOICES
from t2l_framework.training.budget import EXIT_CUT_SHORT
from t2l_framework.training.divergence import EXIT_DIVERGED


def _parser_for(sub, name: str, help: str, example: str, parents: list | None = None) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` ends with an example; ``parents``: shared options (``_options``)."""
    return sub.add_parser(
        name, help=help, description=help, parents=parents or [],
        epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --- validate -----------------------------------------------------------------------------

def cmd_validate(args) -> int:
    from t2l_framework.assembly import load_recipe
    from t2l_framework.config import find_recipe, to_yaml

    cfg = load_recipe(args.recipe, args.overrides, import_code=args.trust_remote_code)
    print(to_yaml(cfg), end="")
    print(f"# OK: {args.recipe} is valid", file=sys.stderr)
    from t2l_framework.training.modes import mode_for

    if cfg.data.task_set and mode_for(cfg).reads_instances:
        from t2l_framework.data.task_sets import check_task_set

        try:  # the recipe is valid; its data may not be downloaded yet, and `t2l fit` will stop on that
            check_task_set(cfg.data, find_recipe(args.recipe))
        except T2LError as exc:
            print(f"# warning: `t2l fit` will stop: {exc}", file=sys.stderr)
    return 0


# --- recipes ------------------------------------------------------------------------------

def cmd_recipes(args) -> int:
    """``t2l recipes`` / ``t2l recipes ls``: the shipped recipes, one line each."""
    from t2l_framework.config import recipe_description, recipes_dir

    files = sorted(recipes_dir().glob("*.yaml"))
    width = max((len(f.stem) for f in files), default=10)
    for f in files:
        print(f"{f.stem:<{width}}  {recipe_description(f)}")
    return 0


def cmd_recipes_cp(args) -> int:
    """``t2l recipes cp NAME DEST``: a shipped recipe copied for editing."""
    from t2l_framework.config import recipes_dir

    shipped = {f.stem: f for f in sorted(recipes_dir().glob("*.yaml"))}
    stem = Path(args.name).stem
    if stem not in shipped:
        raise T2LError(f"no shipped recipe '{args.name}'{did_you_mean(stem, shipped)}; `t2l recipes` lists them")
    target = Path(args.dest)
    if target.is_dir():
        target = target / shipped[stem].name
    if target.exists() and not args.force:
        raise T2LError(f"{target} already exists; pass --force to overwrite")
    shutil.copyfile(shipped[stem], target)
    print(f"copied {stem} to {target}; edit it, then run: t2l validate {target}")
    return 0


# --- plugins ------------------------------------------------------------------------------

def cmd_plugins(args) -> int:
    from t2l_framework.plugins import registry

    reg = registry()
    for info in reg.plugins:
        version = f" {info.version}" if info.version else ""
        print(f"{info.name}{version}  ({info.source})")
        if info.error:
            print(f"  FAILED TO LOAD: {info.error}")
        for kind, names in info.registered.items():
            print(f"  {kind}: {', '.join(names)}")
    return 0


# --- fit --------------------------------------------------------------------------------

def cmd_fit(args) -> int:
    from t2l_framework.assembly import fit
    from t2l_framework.training.budget import exit_status
    from t2l_framework.training.run import TrainingInterrupted

    try:
        run_dir = fit(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:  # the checkpoint is on disk; a script must not take this for success
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    code = exit_status(run_dir)
    if code == EXIT_DIVERGED:
        print(f"error: training diverged: its loss ended far above where it started (see {run_dir}/"
              "training_status.json)", file=sys.stderr)
    elif code:
        print(f"error: training was cut short by trainer.max_time (see {run_dir}/training_status.json); "
              "set training.allow_cut_short=true to accept that", file=sys.stderr)
    return code


# --- generate / serve -----------------------------------------------------------------------

DTYPE_HELP = ("base model weights (default auto: bfloat16 on GPUs and on CPUs with native bf16, "
              "float32 otherwise; 'recipe' = the run's base_model.dtype)")


TRUST_HELP = ("let the run execute code it names (a model's custom modelling code, a head given by import path); "
              "without it such runs are refused, since a run folder is untrusted input")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(bind: str) -> list[str] | None:
    """Host headers accepted when bound to this machine only: a web page elsewhere cannot reach the
    API through DNS rebinding. None (any Host) when bound to a public address."""
    return ["127.0.0.1", "localhost", "[::1]"] if bind in LOOPBACK else None


def _dtype(args) -> str | None:
    """``--dtype``: a dtype name or auto; 'recipe' (None) keeps the run's ``base_model.dtype``."""
    return None if args.dtype == "recipe" else args.dtype


def cmd_generate(args) -> int:
    import json

    from t2l_framework.assembly import load_runtime

    descriptions = [d.strip() for d in args.descriptions]
    if args.from_file:
        path = Path(args.from_file)
        if not path.is_file():
            raise T2LError(f"--from-file: {path} does not exist")
        descriptions += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not descriptions or not all(descriptions):
        raise T2LError("give one or more non-empty task descriptions, or --from-file FILE with one per line")
    out = Path(args.output or ("adapter" if len(descriptions) == 1 else "adapters"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise T2LError(f"{out} already exists; pass --force to overwrite it, or -o DIR for another folder")
    say(f"loading {args.run} ...")
    runtime = load_runtime(args.run, dtype=_dtype(args), trust_remote_code=args.trust_remote_code,
                           revision=args.revision)
    weights = runtime.adapters(descriptions)  # one hypernetwork forward for all of them
    folders = [out] if len(descriptions) == 1 else [out / f"adapter_{i:03d}" for i in range(len(descriptions))]
    runtime.export(weights, folders)
    if len(descriptions) > 1:
        from t2l_framework.atomic import write_text_atomic

        write_text_atomic(out / "descriptions.json", json.dumps(
            {"hypernetwork": runtime.name, "base_model": runtime.base_model_name,
             "adapters": [{"folder": f.name, "description": d} for f, d in zip(folders, descriptions)]}, indent=2) + "\n")
    for folder, desc in zip(folders, descriptions):
        print(f"wrote {folder}  ({desc})")
    if not args.no_familiarity:
        for line in _familiarity_lines(runtime.generator, args.run, args.revision, descriptions):
            print(line)
    if args.chat:
        rows = [None] + [weights.select(i) for i in range(len(descriptions))]
        answers = runtime.chat([args.chat] * len(rows), rows, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature)
        labels = ["base model"] + (["adapted"] if len(folders) == 1 else [f.name for f in folders])
        width = max(len(label) for label in labels)
        print(f"\nprompt: {args.chat}")
        for label, answer in zip(labels, answers):
            print(f"  {label:<{width}}  {answer.text.strip()}")
    return 0


def _familiarity_lines(generator, run: str, revision: str | None, descriptions: list[str]) -> list[str]:
    """One verdict line per description (``t2l inspect`` has the details); a run whose training
    data is not on this machine says so instead of failing the command."""
    from t2l_framework.assembly.hub import resolve_run
    from t2l_framework.assembly.inspect import inspector_for
    from t2l_framework.run_folder import locate_hypernet

    try:
        inspector = inspector_for(generator, locate_hypernet(resolve_run(run, revision))[1])
    except T2LError as exc:
        return [f"familiarity: not available ({exc})"]
    rows = inspector.familiarity(descriptions)
    prefix = len(descriptions) > 1
    return [f"familiarity{f' [{i:03d}]' if prefix else ''}: {r['familiarity']:.0f}th percentile, {r['verdict']} "
            f"(nearest task {r['nearest_tasks'][0]['task']}, cosine {r['nearest_tasks'][0]['cosine']:.2f})"
            for i, r in enumerate(rows)]


def _server_inspector(runtime, args):
    """The server's ``Inspector`` (familiarity in ``/v1/adapters``, ``/v1/inspect``), or None with
    the reason logged when the run's training data is not here."""
    from t2l_framework.assembly.hub import resolve_run
    from t2l_framework.assembly.inspect import inspector_for
    from t2l_framework.run_folder import locate_hypernet

    if args.no_familiarity:
        return None
    try:
        return inspector_for(runtime.generator, locate_hypernet(resolve_run(args.run, args.revision))[1])
    except T2LError as exc:
        say(f"familiarity is off: {exc}")
        return None


def cmd_serve(args) -> int:
    import logging

    try:
        import uvicorn

        from t2l_framework.serve import create_app
    except ModuleNotFoundError as exc:
        raise T2LError(f"t2l serve needs the 'serve' extra ({exc.name} is missing): "
                       "pip install 't2l-framework[serve]'") from None
    from t2l_framework.assembly import load_runtime

    if args.batch_window_ms < 0:
        raise T2LError("--batch-window-ms must be at least 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in LOOPBACK:
        say(f"binding to {args.host}: the API has no authentication; anyone who can reach this port can use it")
    say(f"loading {args.run} ...")
    runtime = load_runtime(args.run, dtype=_dtype(args), trust_remote_code=args.trust_remote_code,
                           revision=args.revision)
    app = create_app(runtime,
                     max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, cache_size=args.cache_size,
                     max_body_bytes=args.max_body_kb * 1024, allowed_hosts=allowed_hosts(args.host),
                     inspector=_server_inspector(runtime, args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


# --- eval ---------------------------------------------------------------------------------



def cmd_eval(args) -> int:
    from t2l_framework.assembly.evaluate import evaluate, likelihood_check
    from t2l_framework.eval.report import markdown_table

    if args.likelihood_only:
        if args.answer_loglik is False:
            raise T2LError("--likelihood-only scores the answer likelihood; it cannot go with --no-answer-loglik")
        md, files = likelihood_check(
            args.run_or_recipe, comma_list(args.benchmarks) or ["sni_unseen"], comma_list(args.adapters),
            output=args.output, revision=args.revision, limit=args.limit, n_descriptions=args.n_descriptions,
            batch_size=args.batch_size, seed=args.seed, data_root=args.data_root, device=args.device,
            dtype=_dtype(args), trust_remote_code=args.trust_remote_code, use_cache=False)
        print()
        print(md, end="")
        for kind, path in files.items():
            print(f"wrote {path}  ({kind})")
        return 0
    done = evaluate(args.run_or_recipe, comma_list(args.benchmarks), comma_list(args.adapters),
                    revision=args.revision, limit=args.limit, n_descriptions=args.n_descriptions,
                    protocol=args.protocol, scoring=args.scoring, mc_answer=args.mc_answer,
                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    code_timeout_s=args.code_timeout, seed=args.seed, arrow_top_k=args.arrow_top_k,
                    arrow_temperature=args.arrow_temperature, answer_loglik=args.answer_loglik,
                    output=args.output, cache_dir=args.cache_dir,
                    use_cache=not args.no_cache, data_root=args.data_root, device=args.device,
                    dtype=_dtype(args), trust_remote_code=args.trust_remote_code)
    results = done.results
    print()
    print(markdown_table(dict(results)), end="")
    print(f"\n{results['seconds']:.0f} s; cache: {results['cache']['hits']} hits, {results['cache']['misses']} misses")
    for kind, path in done.files.items():
        print(f"wrote {path}  ({kind})")
    return 0


# --- import-reference -----------------------------------------------------------------------

def cmd_import_reference(args) -> int:
    from t2l_framework.hypernet.reference_import import import_reference

    from t2l_framework.assembly.hub import REFERENCE_FILES, resolve_run

    order = comma_list(args.module_order) or None
    folder = resolve_run(args.folder, args.revision, args.subfolder, files=REFERENCE_FILES)
    out = import_reference(folder, args.output, module_order=order, force=args.force)
    print(f"wrote {out}  (load it like any run: t2l generate {out} \"DESCRIPTION\")")
    return 0


# --- push / inspect -------------------------------------------------------------------------

def cmd_push(args) -> int:
    from t2l_framework.assembly.hub import T2LRun

    run = Path(args.run).expanduser()
    if not run.is_dir():
        raise T2LError(f"{run}: no such run folder; `t2l push` uploads a local run (runs/NAME)")
    url = T2LRun(run).push_to_hub(args.repo_id, private=args.private or None, create_pr=args.create_pr or None,
                                  branch=args.revision)
    print(f"pushed {run} to {args.repo_id}: {url}")
    return 0


def cmd_inspect(args) -> int:
    from t2l_framework.assembly.inspect import inspect_run

    rows = inspect_run(args.run, args.descriptions, revision=args.revision, k=args.top, json_file=args.json,
                       png_file=args.png, device=args.device, trust_remote_code=args.trust_remote_code)
    for row in rows:
        print(f"\n{row['description']}")
        print(f"  familiarity: {row['familiarity']:.0f}th percentile (max cosine {row['similarity']:.3f}); "
              f"{row['verdict']}")
        print("  nearest training descriptions:")
        for n in row["nearest_descriptions"]:
            print(f"    {n['cosine']:.3f}  {n['task']:<12} {n['description'][:90]}")
        print("  nearest tasks (encoder):   " + ", ".join(f"{t['task']} {t['cosine']:.3f}" for t in row["nearest_tasks"]))
        print("  closest adapters (ΔW cos, centred on the mean-task adapter): "
              + ", ".join(f"{t['task']} {t['cosine']:.3f}" for t in row["closest_adapters"]))
        cells = len(row["norms"]) * len(row["modules"])
        print(f"  adapter norm: {row['norms_outside_training_range']} of {cells} layer x module cells outside the "
              "training tasks' range")
    for kind, path in (("json", args.json), ("png", args.png)):
        if path:
            print(f"wrote {path}  ({kind})")
    return 0


# --- data fetch ---------------------------------------------------------------------------

def cmd_data_fetch(args) -> int:
    from t2l_framework.config import resolve_path
    from t2l_framework.data.fetch import HubSource, fetch_tasks, summary

    source = HubSource(hub_root=args.hub, descriptions_root=Path(args.descriptions_from) if args.descriptions_from
                       else None, cache_dir=args.cache_dir)
    report = fetch_tasks(args.task_set, resolve_path(args.output), resolve_path(args.tasks_file), source=source,
                         retries=args.retries, backoff_s=args.backoff, max_train=args.max_train,
                         max_test=args.max_test, only=comma_list(args.only) or None,
                         give_up_after=args.give_up_after, say=say)
    print(summary(report, args.task_set))
    if args.output != "data/sni_hub" and report.missing == 0:  # the paper recipes' data.fetched_dir
        print(f"recipes read it with data.fetched_dir={args.output}")
    return 1 if report.missing else 0


# --- main ---------------------------------------------------------------------------------

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # 2: argparse's own
EXIT_CODES = textwrap.dedent(f"""\
    exit status:
      {EXIT_OK}    success
      {EXIT_FAILED}    failure: bad input (one line; --debug adds its traceback) or a bug (its traceback and
           a request to report it); `t2l data fetch` also while any task is still missing
      {EXIT_USAGE}    usage error: unknown command or option, a missing or malformed argument
      {EXIT_CUT_SHORT}    `t2l fit`: trainer.max_time stopped the run before trainer.max_steps (its checkpoint and
           reports are written; training.allow_cut_short=true makes that 0)
      {EXIT_DIVERGED}    `t2l fit`: training diverged (mean loss of the last 10 batches above 2x the first batch's,
           or non-finite); its files and reports are written, every row it trained marked DIVERGED
      {EXIT_INTERRUPTED}  interrupted by Ctrl-C (SIGINT); `t2l fit` after writing its checkpoint
      143  `t2l fit` stopped by SIGTERM after writing its checkpoint (other commands end by the
           signal itself, which a shell also reports as 143)
    """)


def _version() -> str:
    """The installed distribution's version; the package's own when it is run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("t2l-framework")
    except PackageNotFoundError:
        from t2l_framework import __version__

        return f"{__version__} (not installed)"


def _count(low: int):
    """An argparse type: an integer >= ``low``; anything else is a usage error naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _options(*adders) -> argparse.ArgumentParser:
    """A parent parser holding options that several commands share (``parents=[...]``)."""
    parent = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _recipe_args(p):
    p.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, key=value")


def _hub_revision(p):
    p.add_argument("--revision", help="hub ids only: branch, tag or commit of the Hub repo (default main)")


def _dtype_option(p):
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES + ("recipe",), help=DTYPE_HELP)


def _trust_option(p):
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def _device_option(p):
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


RECIPE = _options(_recipe_args)
LOADS_A_RUN = _options(_hub_revision, _trust_option)  # a run folder or hub id, untrusted input
RUNS_A_MODEL = _options(_dtype_option)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2l",
        description="Text-to-LoRA: train a hypernetwork once, then adapt an LLM to a task by describing it.",
        epilog=textwrap.dedent("""\
            examples:
              t2l recipes                              list shipped recipes
              t2l validate recipes/mistral_L.yaml      print the resolved recipe
              t2l fit smollm2_demo                     train the CPU demo
              t2l eval runs/smollm2_demo --limit 50    score it on the paper's ten benchmarks

            """) + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _parser_for(sub, "validate", "Check a recipe and print it fully resolved.",
                    "t2l validate recipes/mistral_L.yaml hypernet.head=chunked trainer.max_steps=10", [RECIPE])
    p.add_argument("--trust-remote-code", action="store_true",
                   help="also import a head named by import path (runs that module); by default it is only looked up")
    p.set_defaults(func=cmd_validate)

    recipes = _parser_for(sub, "recipes", "List shipped recipes (`ls`, the default), or copy one for editing (`cp`).",
                          "t2l recipes cp mistral_L my_recipe.yaml")
    recipes.set_defaults(func=cmd_recipes)
    recipes_sub = recipes.add_subparsers(dest="recipes_command", metavar="ACTION")
    p = _parser_for(recipes_sub, "ls", "List the shipped recipes with their one-line descriptions.", "t2l recipes ls")
    p.set_defaults(func=cmd_recipes)
    p = _parser_for(recipes_sub, "cp", "Copy a shipped recipe to edit it.", "t2l recipes cp mistral_L my_recipe.yaml")
    p.add_argument("name", help="a shipped recipe (`t2l recipes ls`)")
    p.add_argument("dest", help="file to write, or a folder to write NAME.yaml into")
    p.add_argument("--force", action="store_true", help="overwrite DEST")
    p.set_defaults(func=cmd_recipes_cp)

    p = _parser_for(sub, "plugins", "List loaded plugins, their versions and what each registered.",
                    "T2L_PLUGINS=e5 t2l plugins")
    p.set_defaults(func=cmd_plugins)

    p = _parser_for(sub, "fit", "Train a hypernetwork (or a LoRA baseline) from a recipe.",
                    "t2l fit smollm2_demo trainer.max_steps=50   # or: t2l fit recipes/mistral_L.yaml --resume",
                    [RECIPE])
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder of the same name first")
    p.set_defaults(func=cmd_fit)

    p = _parser_for(sub, "eval", "Score base / base+description / T2L / PEFT adapters on benchmarks; "
                    "writes results.json, results.md and results.png.",
                    "t2l eval runs/smollm2_demo --limit 50   # or: t2l eval recipes/mistral_L.yaml "
                    "--adapters base,oracle=lora/arc --benchmarks arc_easy,gsm8k\n"
                    "  t2l eval runs/smollm2_demo --benchmarks sni_unseen --likelihood-only "
                    "--adapters t2l,other_description,random_description,generic_description",
                    [LOADS_A_RUN, RUNS_A_MODEL, _options(_device_option)])
    p.add_argument("run_or_recipe", help="trained run folder (runs/NAME), hypernet folder, hub id (ORG/NAME), or a "
                   "recipe (base model only)")
    p.add_argument("--benchmarks", action="append", metavar="LIST",
                   help="comma-separated benchmark names, 'paper' (the ten of the T2L paper, the default), or 'all' "
                        "(adds sni_unseen and plugin benchmarks); `t2l plugins` lists them")
    p.add_argument("--adapters", action="append", metavar="LIST",
                   help="comma-separated: base, base+description, t2l, the controls other_description, "
                        "random_description, generic_description (the run's hypernetwork given another task's "
                        "description, random letters of the same length, or 'Answer the question.'), "
                        "arrow=LIBRARY_DIR (Arrow routing over a folder of PEFT task adapters; plain 'arrow': the "
                        "recipe's eval.arrow_library), NAME=PATH (a PEFT folder or another T2L run); default: base, "
                        "base+description, t2l and the recipe's eval.baseline_adapter and eval.arrow_library")
    p.add_argument("--limit", type=_count(0), default=None,
                   help="items per benchmark, 0 = all (default: the recipe's eval.limit)")
    p.add_argument("--n-descriptions", type=_count(1), default=None,
                   help="descriptions averaged per benchmark (default: the recipe's eval.n_descriptions)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                   help=f"{PROTOCOL_HELP} (default: the recipe's eval.protocol, else {DEFAULT_PROTOCOL})")
    p.add_argument("--scoring", default="loglik", choices=["loglik", "generate"],
                   help="--protocol chat only: multiple choice by option log-likelihood (default) or by generating "
                        "and extracting the answer")
    p.add_argument("--mc-answer", default="label", choices=["label", "text"],
                   help="--protocol chat only: log-likelihood of the option label the prompt asks for (default) or "
                        "of the option text, normalised by its length in bytes")
    p.add_argument("--batch-size", type=_count(1), default=None,
                   help="rows per forward (default: the recipe's eval.batch_size)")
    p.add_argument("--max-new-tokens", type=_count(1), default=None,
                   help="cap on generated tokens (default: each benchmark's own length; a run's own "
                        "sni_seen / sni_unseen answer in its recipe's eval.max_new_tokens)")
    p.add_argument("--arrow-top-k", type=int, default=ARROW_TOP_K,
                   help=f"Arrow: experts mixed per token (<= 0: all; default {ARROW_TOP_K}, as mttl's arrow_router)")
    p.add_argument("--arrow-temperature", type=float, default=ARROW_TEMPERATURE,
                   help=f"Arrow: routing logits are divided by it (default {ARROW_TEMPERATURE:g}, as mttl's)")
    p.add_argument("--answer-loglik", action=argparse.BooleanOptionalAction, default=None,
                   help="SNI benchmarks: also score each condition by the log-likelihood of the items' reference "
                        "answers (nats/token; default: the recipe's eval.answer_loglik, on)")
    p.add_argument("--likelihood-only", action="store_true",
                   help="score only the reference answers' likelihood, without generating (a minute where a full "
                        "evaluation takes several): a table paired against t2l, in likelihood.md / likelihood.json; "
                        "benchmarks with reference answers (default sni_unseen)")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per HumanEval/MBPP program in the sandbox")
    p.add_argument("--seed", type=int, default=0, help="which descriptions are drawn")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: RUN/eval or eval_results/RECIPE)")
    p.add_argument("--cache-dir", metavar="DIR", help="result cache (default: $T2L_CACHE/eval, ~/.cache/t2l/eval)")
    p.add_argument("--no-cache", action="store_true", help="recompute everything and store nothing")
    p.add_argument("--data-root", metavar="DIR", help="folder with eval/, t2l/ and sni/ (default: the vendored data/)")
    p.set_defaults(func=cmd_eval)

    p = _parser_for(sub, "generate", "Write PEFT adapters for task descriptions with a trained hypernetwork.",
                    't2l generate runs/smollm2_demo "Classify the sentiment of a review" -o sentiment '
                    '--chat "Great film!"', [LOADS_A_RUN, RUNS_A_MODEL])
    p.add_argument("run", help="run folder (runs/NAME), its hypernet/ folder, or a hub id (ORG/NAME)")
    p.add_argument("descriptions", nargs="*", help="task descriptions; several give DIR/adapter_000, ...")
    p.add_argument("--no-familiarity", action="store_true",
                   help="skip the familiarity line (it embeds the run's training descriptions once, then is cached)")
    p.add_argument("-o", "--output", metavar="DIR", help="adapter folder (default: adapter/, or adapters/ for several)")
    p.add_argument("--from-file", metavar="FILE", help="more descriptions, one per line")
    p.add_argument("--chat", metavar="PROMPT", help="also answer PROMPT with each adapter and with the base model")
    p.add_argument("--max-new-tokens", type=_count(1), default=64, help="answer length for --chat (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for --chat (0 = greedy)")
    p.add_argument("--force", action="store_true", help="write into an existing output folder")
    p.set_defaults(func=cmd_generate)

    data = _parser_for(sub, "data", "Training data: `t2l data fetch` downloads the paper's SNI tasks.",
                       "t2l data fetch --set paper479")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = _parser_for(data_sub, "fetch", "Download the tasks of a task set (default: the paper's 479 SNI training "
                    "tasks) that the bundle lacks, from the Hugging Face hub (Lots-of-LoRAs/<task>), into the "
                    "bundle's JSONL format; resumes, retries with backoff, exits 1 while any task is missing.",
                    "t2l data fetch   # then: t2l fit recipes/mistral_L.yaml (it reads data/sni_hub)")
    p.add_argument("--set", dest="task_set", default="paper479", help="task set (default paper479)")
    p.add_argument("-o", "--output", default="data/sni_hub", metavar="DIR",
                   help="where to write tasks.jsonl, instances.jsonl and parts/ (default data/sni_hub, "
                        "what the paper recipes read as data.fetched_dir)")
    p.add_argument("--tasks-file", default="data/sni/tasks.jsonl.gz", help="bundled tasks, not downloaded again")
    p.add_argument("--retries", type=_count(0), default=5, help="retries per task after a failure (default 5)")
    p.add_argument("--backoff", type=float, default=2.0,
                   help="seconds before the first retry, doubled after each (default 2)")
    p.add_argument("--max-train", type=_count(1), default=10000,
                   help="train rows per task (default 10000: the reference's train[:10000])")
    p.add_argument("--max-test", type=_count(0), default=100, help="test rows per task (default 100)")
    p.add_argument("--only", action="append", metavar="LIST", help="comma-separated task ids to fetch now")
    p.add_argument("--give-up-after", type=_count(1), default=3, metavar="N",
                   help="stop after N tasks in a row failed every retry (default 3)")
    p.add_argument("--hub", default="Lots-of-LoRAs",
                   help="hub organisation, or a local folder holding one dataset folder per SNI task")
    p.add_argument("--descriptions-from", metavar="DIR",
                   help="a local checkout of SakanaAI/text-to-lora (tasks/*/metadata.yaml) instead of downloading")
    p.add_argument("--cache-dir", metavar="DIR", help="datasets cache (default: the datasets library's)")
    p.set_defaults(func=cmd_data_fetch)

    p = _parser_for(sub, "serve", "Serve a trained hypernetwork: adapter API, OpenAI-compatible chat, web page.",
                    "t2l serve runs/smollm2_demo --port 8000   # then open http://127.0.0.1:8000/",
                    [LOADS_A_RUN, RUNS_A_MODEL])
    p.add_argument("run", help="run folder (runs/NAME), its hypernet/ folder, or a hub id (ORG/NAME)")
    p.add_argument("--no-familiarity", action="store_true",
                   help="answers without familiarity / nearest tasks, and no /v1/inspect")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=_count(1), default=16, help="requests decoded together (1 = one at a time)")
    p.add_argument("--batch-window-ms", type=float, default=30.0, help="a batch waits this long after its latest request for more (at most 4x after its first)")
    p.add_argument("--cache-size", type=_count(1), default=128, help="generated adapters kept in memory (LRU)")
    p.add_argument("--max-body-kb", type=_count(1), default=1024, help="largest request body in KiB (default 1024); "
                   "bigger requests get 413")
    p.set_defaults(func=cmd_serve)

    p = _parser_for(sub, "import-reference",
                    "Convert a released T2L reference checkpoint folder (hypermod.pt, args.yaml, adapter_config.json "
                    "of SakanaAI/text-to-lora) into a run folder that generate, serve and eval load.",
                    "t2l import-reference trained_t2l/mistral_7b_t2l -o runs/mistral_t2l_ref --module-order q_proj,v_proj",
                    [_options(_hub_revision)])
    p.add_argument("folder", help="reference checkpoint folder (hypermod.pt is read with weights_only=True), or a "
                   "hub id (ORG/NAME) with --subfolder")
    p.add_argument("--subfolder", help="hub ids: the checkpoint folder inside the repo, e.g. trained_t2l/mistral_7b_t2l")
    p.add_argument("-o", "--output", metavar="RUN", required=True, help="run folder to write")
    p.add_argument("--module-order", metavar="LIST",
                   help="comma-separated target modules in the order of the reference's module-type embedding rows "
                        "(it kept them in a hash-seed-dependent set); default: adapter_config.json's target_modules "
                        "order, see docs/parity.md")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty RUN folder")
    p.set_defaults(func=cmd_import_reference)

    p = _parser_for(sub, "push", "Upload a trained run to the Hugging Face Hub (model card, config.json, safetensors).",
                    "t2l push runs/smollm2_demo my-org/smollm2-t2l --private")
    p.add_argument("run", help="local run folder (runs/NAME)")
    p.add_argument("repo_id", help="hub repo id, ORG/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    p.set_defaults(func=cmd_push)

    p = _parser_for(sub, "inspect", "Why a description gives its adapter: nearest training descriptions and tasks, "
                    "familiarity, adapter norms per layer and module, closest training adapters; JSON and PNG.",
                    't2l inspect runs/smollm2_demo "Classify the sentiment of a review" --png inspect.png',
                    [LOADS_A_RUN, _options(_device_option)])
    p.add_argument("run", help="run folder (runs/NAME) or a hub id (ORG/NAME)")
    p.add_argument("descriptions", nargs="+", help="task descriptions")
    p.add_argument("--json", metavar="FILE", help="write the full result as JSON")
    p.add_argument("--png", metavar="FILE", help="write the heat map and nearest-task bars as PNG")
    p.add_argument("--top", type=_count(1), default=5, help="neighbours listed (default 5)")
    p.set_defaults(func=cmd_inspect)
    return parser


DEBUG_HELP = "show the traceback of every error, also of bad input (which is otherwise one line)"
BUG_HINT = ("t2l: this is a bug in t2l-framework, not a problem with your input; please report it with the "
            "traceback above and the command you ran")


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--debug`` before the command (``t2l --debug fit ...``) and after it, on every sub-command."""
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP,
                        **({} if top else {"default": argparse.SUPPRESS}))  # a sub-command keeps the global one
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub, top=False)


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status is one of ``EXIT_CODES`` (argparse exits 2 itself)."""
    import traceback

    parser = build_parser()
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_OK
    try:
        return int(args.func(args) or EXIT_OK)
    except T2LError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader closed our output (`t2l recipes | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return EXIT_FAILED
    except Exception:  # noqa: BLE001 - every other exception escaping a command is a bug
        traceback.print_exc()
        print(BUG_HINT, file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
