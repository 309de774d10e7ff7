"""The `t2l` command: validate, recipes, plugins, fit, generate.

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
    from t2l_framework.training.run import fit

    try:
        fit(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
    except Exception as exc:
        if type(exc).__name__ == "SIGTERMException":
            print("stopped by SIGTERM; a checkpoint was written: continue with --resume", file=sys.stderr)
            return 143
        raise
    return 0


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
