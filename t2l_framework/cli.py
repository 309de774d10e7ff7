"""The `t2l` command: validate, recipes, plugins, fit, eval, generate, serve.

Each sub-command is a small ``cmd_*`` function; a ``T2LError`` is printed as one line
without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path

from t2l_framework.errors import T2LError, did_you_mean
from t2l_framework.llm.dtype import DTYPE_CHOICES


def _parser_for(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help,
        epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --- validate -----------------------------------------------------------------------------

def cmd_validate(args) -> int:
    from t2l_framework.config import load_recipe, to_yaml

    cfg = load_recipe(args.recipe, args.overrides)
    print(to_yaml(cfg), end="")
    print(f"# OK: {args.recipe} is valid", file=sys.stderr)
    return 0


# --- recipes ------------------------------------------------------------------------------

def cmd_recipes(args) -> int:
    from t2l_framework.config import recipe_description, recipes_dir

    files = sorted(recipes_dir().glob("*.yaml"))
    if args.action is None:
        width = max((len(f.stem) for f in files), default=10)
        for f in files:
            print(f"{f.stem:<{width}}  {recipe_description(f)}")
        return 0
    if args.action != "cp" or len(args.names) != 2:
        raise T2LError("usage: t2l recipes cp NAME DEST (for example: t2l recipes cp mistral_L my_recipe.yaml)")
    name, dest = args.names
    shipped = {f.stem: f for f in files}
    stem = Path(name).stem
    if stem not in shipped:
        raise T2LError(f"no shipped recipe '{name}'{did_you_mean(stem, shipped)}; `t2l recipes` lists them")
    target = Path(dest)
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
    from t2l_framework.training.budget import exit_status
    from t2l_framework.training.run import fit

    try:
        run_dir = fit(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
    except Exception as exc:
        if type(exc).__name__ == "SIGTERMException":
            print("stopped by SIGTERM; a checkpoint was written: continue with --resume", file=sys.stderr)
            return 143
        raise
    code = exit_status(run_dir)
    if code:
        print(f"error: training was cut short by trainer.max_time (see {run_dir}/training_status.json); "
              "set training.allow_cut_short=true to accept that", file=sys.stderr)
    return code


# --- generate / serve -----------------------------------------------------------------------

DTYPE_HELP = ("base model weights (default auto: bfloat16 on GPUs and on CPUs with native bf16, "
              "float32 otherwise; 'recipe' = the run's base_model.dtype)")


def _dtype(args) -> str | None:
    """``--dtype``: a dtype name or auto; 'recipe' (None) keeps the run's ``base_model.dtype``."""
    return None if args.dtype == "recipe" else args.dtype


def _say(msg: str) -> None:
    print(f"[t2l] {msg}", file=sys.stderr, flush=True)


def cmd_generate(args) -> int:
    import json

    from t2l_framework.inference import load_run

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
    _say(f"loading {args.run} ...")
    runtime = load_run(args.run, dtype=_dtype(args))
    weights = runtime.adapters(descriptions)  # one hypernetwork forward for all of them
    folders = [out] if len(descriptions) == 1 else [out / f"adapter_{i:03d}" for i in range(len(descriptions))]
    runtime.export(weights, folders)
    if len(descriptions) > 1:
        (out / "descriptions.json").write_text(json.dumps(
            {"hypernetwork": runtime.name, "base_model": runtime.base_model_name,
             "adapters": [{"folder": f.name, "description": d} for f, d in zip(folders, descriptions)]}, indent=2) + "\n")
    for folder, desc in zip(folders, descriptions):
        print(f"wrote {folder}  ({desc})")
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


def cmd_serve(args) -> int:
    import logging

    try:
        import uvicorn

        from t2l_framework.serve import create_app
    except ModuleNotFoundError as exc:
        raise T2LError(f"t2l serve needs the 'serve' extra ({exc.name} is missing): "
                       "pip install 't2l-framework[serve]'") from None
    from t2l_framework.inference import load_run

    if args.max_batch < 1 or args.cache_size < 1 or args.batch_window_ms < 0:
        raise T2LError("--max-batch and --cache-size must be at least 1, --batch-window-ms at least 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _say(f"binding to {args.host}: the API has no authentication; anyone who can reach this port can use it")
    _say(f"loading {args.run} ...")
    app = create_app(load_run(args.run, dtype=_dtype(args)), max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                     cache_size=args.cache_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


# --- eval ---------------------------------------------------------------------------------


def _split_list(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def cmd_eval(args) -> int:
    from t2l_framework.config import find_recipe, load_recipe
    from t2l_framework.eval.benchmarks import get_benchmarks
    from t2l_framework.eval.cache import ResultCache, default_cache_dir
    from t2l_framework.eval.harness import EvalSettings, Evaluator, parse_adapters
    from t2l_framework.eval.report import markdown_table, write_outputs
    from t2l_framework.inference import load_generator, runtime_for

    target = Path(args.run_or_recipe).expanduser()
    own_adapter: list[str] = []
    generator = None
    if target.is_dir() and (target / "adapter" / "adapter_config.json").is_file() and (target / "recipe.yaml").is_file():
        recipe_file = target / "recipe.yaml"  # a LoRA-baseline run: its base model, and its adapter by default
        cfg, default_out = load_recipe(recipe_file), target / "eval"
        own_adapter = [f"{target.resolve().name}={target / 'adapter'}"]
    elif target.is_dir():  # a trained T2L run (or hypernet) folder; loaded once the arguments are checked
        recipe_file = target / "recipe.yaml" if (target / "recipe.yaml").is_file() else None
        cfg, default_out = (load_recipe(recipe_file) if recipe_file else None), target / "eval"
    else:
        recipe_file = find_recipe(args.run_or_recipe)
        cfg, default_out = load_recipe(recipe_file), Path("eval_results") / recipe_file.stem
    is_t2l_run = target.is_dir() and not own_adapter
    ev = cfg.eval if cfg is not None else None
    adapters = _split_list(args.adapters) or (["base", "base+description"] + (["t2l"] if is_t2l_run else []) + own_adapter)
    if not args.adapters and not own_adapter and ev is not None and ev.baseline_adapter:
        from t2l_framework.config import resolve_path

        baseline = resolve_path(ev.baseline_adapter, recipe_file)
        if baseline.is_dir():
            adapters.append(str(baseline))
        else:
            _say(f"eval.baseline_adapter {ev.baseline_adapter} does not exist; evaluating without it")
    specs = parse_adapters(adapters, have_run=is_t2l_run)
    names = _split_list(args.benchmarks) or (list(ev.benchmarks) if ev is not None and ev.benchmarks else ["paper"])
    benchmarks = get_benchmarks(names, args.data_root)
    settings = EvalSettings(
        limit=args.limit if args.limit is not None else (ev.limit if ev is not None else 0),
        n_descriptions=args.n_descriptions or (ev.n_descriptions if ev is not None else 3),
        scoring=args.scoring, mc_answer=args.mc_answer,
        batch_size=args.batch_size or (ev.batch_size if ev is not None else 16),
        max_new_tokens=args.max_new_tokens, code_timeout_s=args.code_timeout, seed=args.seed)
    device = args.device or _default_device()
    if is_t2l_run:
        generator = load_generator(target, device)
        base_cfg = generator.base_config
    else:
        base_cfg = cfg.base_model
    _say(f"loading {base_cfg.name_or_path} ...")
    runtime = runtime_for(base_cfg, device, _dtype(args), generator)
    cache = ResultCache(None if args.no_cache else (args.cache_dir or default_cache_dir()))
    evaluator = Evaluator(runtime, specs, settings, cache)
    _say(f"evaluating {', '.join(s.name for s in specs)} on {', '.join(b.name for b in benchmarks)}"
         f" ({'all' if not settings.limit else settings.limit} items each)")
    results, predictions = evaluator.run(benchmarks)
    files = write_outputs(results, predictions, Path(args.output) if args.output else default_out)
    print()
    print(markdown_table(dict(results)), end="")
    print(f"\n{results['seconds']:.0f} s; cache: {results['cache']['hits']} hits, {results['cache']['misses']} misses")
    for kind, path in files.items():
        print(f"wrote {path}  ({kind})")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- main ---------------------------------------------------------------------------------


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
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _parser_for(sub, "validate", "Check a recipe and print it fully resolved.",
                    "t2l validate recipes/mistral_L.yaml hypernet.head=chunked trainer.max_steps=10")
    p.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, key=value")
    p.set_defaults(func=cmd_validate)

    p = _parser_for(sub, "recipes", "List shipped recipes, or copy one for editing (`cp NAME DEST`).",
                    "t2l recipes cp mistral_L my_recipe.yaml")
    p.add_argument("action", nargs="?", choices=["cp"], help="cp: copy a shipped recipe")
    p.add_argument("names", nargs="*", help="NAME DEST for cp")
    p.add_argument("--force", action="store_true", help="overwrite DEST")
    p.set_defaults(func=cmd_recipes)

    p = _parser_for(sub, "plugins", "List loaded plugins, their versions and what each registered.",
                    "T2L_PLUGINS=e5 t2l plugins")
    p.set_defaults(func=cmd_plugins)

    p = _parser_for(sub, "fit", "Train a hypernetwork (or a LoRA baseline) from a recipe.",
                    "t2l fit smollm2_demo trainer.max_steps=50   # or: t2l fit recipes/mistral_L.yaml --resume")
    p.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, key=value")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder of the same name first")
    p.set_defaults(func=cmd_fit)

    p = _parser_for(sub, "eval", "Score base / base+description / T2L / PEFT adapters on benchmarks; "
                    "writes results.json, results.md and results.png.",
                    "t2l eval runs/smollm2_demo --limit 50   # or: t2l eval recipes/mistral_L.yaml "
                    "--adapters base,oracle=lora/arc --benchmarks arc_easy,gsm8k")
    p.add_argument("run_or_recipe", help="trained run folder (runs/NAME), hypernet folder, or a recipe (base model only)")
    p.add_argument("--benchmarks", action="append", metavar="LIST",
                   help="comma-separated benchmark names, 'paper' (the ten of the T2L paper, the default), or 'all' "
                        "(adds sni_unseen and plugin benchmarks); `t2l plugins` lists them")
    p.add_argument("--adapters", action="append", metavar="LIST",
                   help="comma-separated: base, base+description, t2l, NAME=PATH (a PEFT folder or another T2L run); "
                        "default: base, base+description, t2l and the recipe's eval.baseline_adapter")
    p.add_argument("--limit", type=int, default=None, help="items per benchmark (default: the recipe's eval.limit; 0 = all)")
    p.add_argument("--n-descriptions", type=int, default=0, help="descriptions averaged per benchmark (default 3)")
    p.add_argument("--scoring", default="loglik", choices=["loglik", "generate"],
                   help="multiple choice by option log-likelihood (default) or by generating and extracting the answer")
    p.add_argument("--mc-answer", default="label", choices=["label", "text"],
                   help="log-likelihood of the option label the prompt asks for (default) or of the option text, "
                        "length-normalised (lm-evaluation-harness acc_norm)")
    p.add_argument("--batch-size", type=int, default=0, help="rows per forward (default: the recipe's eval.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="cap on generated tokens (default: per benchmark)")
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per HumanEval/MBPP program in the sandbox")
    p.add_argument("--seed", type=int, default=0, help="which descriptions are drawn")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: RUN/eval or eval_results/RECIPE)")
    p.add_argument("--cache-dir", metavar="DIR", help="result cache (default: $T2L_CACHE_DIR or ~/.cache/t2l-framework)")
    p.add_argument("--no-cache", action="store_true", help="recompute everything and store nothing")
    p.add_argument("--data-root", metavar="DIR", help="folder with eval/, t2l/ and sni/ (default: the vendored data/)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES + ("recipe",), help=DTYPE_HELP)
    p.set_defaults(func=cmd_eval)

    p = _parser_for(sub, "generate", "Write PEFT adapters for task descriptions with a trained hypernetwork.",
                    't2l generate runs/smollm2_demo "Classify the sentiment of a review" -o sentiment '
                    '--chat "Great film!"')
    p.add_argument("run", help="run folder (runs/NAME) or its hypernet/ folder")
    p.add_argument("descriptions", nargs="*", help="task descriptions; several give DIR/adapter_000, ...")
    p.add_argument("-o", "--output", metavar="DIR", help="adapter folder (default: adapter/, or adapters/ for several)")
    p.add_argument("--from-file", metavar="FILE", help="more descriptions, one per line")
    p.add_argument("--chat", metavar="PROMPT", help="also answer PROMPT with each adapter and with the base model")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length for --chat (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for --chat (0 = greedy)")
    p.add_argument("--force", action="store_true", help="write into an existing output folder")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES + ("recipe",), help=DTYPE_HELP)
    p.set_defaults(func=cmd_generate)

    p = _parser_for(sub, "serve", "Serve a trained hypernetwork: adapter API, OpenAI-compatible chat, web page.",
                    "t2l serve runs/smollm2_demo --port 8000   # then open http://127.0.0.1:8000/")
    p.add_argument("run", help="run folder (runs/NAME) or its hypernet/ folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (1 = one at a time)")
    p.add_argument("--batch-window-ms", type=float, default=30.0, help="how long a batch waits for more requests")
    p.add_argument("--cache-size", type=int, default=128, help="generated adapters kept in memory (LRU)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES + ("recipe",), help=DTYPE_HELP)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except T2LError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
