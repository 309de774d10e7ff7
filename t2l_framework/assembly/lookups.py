"""Lookups by name through the plugin registry: the only module that asks it for components.

Lower packages receive what is looked up here (a head lookup, an encoder factory, the
registered model families, benchmark instances) and never call ``registry()`` themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig

from t2l_framework import config as recipes
from t2l_framework.encoders import TextEncoder, make_encoder
from t2l_framework.errors import T2LError
from t2l_framework.eval.benchmarks import PAPER_BENCHMARKS, Benchmark
from t2l_framework.hypernet.hypernetwork import HeadLookup
from t2l_framework.llm.families import BUILTIN_FAMILIES, ModelFamily
from t2l_framework.plugins import registry
from t2l_framework.training.modes import registered_modes


def head_lookup(import_code: bool = False, key: str = "hypernet.head") -> HeadLookup:
    """name -> ``HypernetHead`` subclass: registered heads, or ``pkg.module:Class`` import paths.

    An import path runs code, so it is imported only where the caller says the user asked:
    ``t2l fit`` of the user's own recipe passes ``import_code=True``, opening a run folder passes
    its ``--trust-remote-code``. Without it, an import path is refused with one line."""

    def lookup(name: str):
        if ":" in name and not import_code:
            raise T2LError(f"{key}: '{name}' is an import path; importing it would run its code, which "
                           "this command only does when asked (--trust-remote-code for a run folder)")
        return registry().get("heads", name, key=key, import_code=import_code)

    return lookup


def model_families() -> dict[str, ModelFamily]:
    """name -> ``ModelFamily`` of every registered family (built-ins even if their plugin was skipped)."""
    reg = registry()
    registered = {name: reg.get("base_models", name) for name in reg.names("base_models")}
    return {**{f.name: f for f in BUILTIN_FAMILIES}, **registered}


def build_encoder(cfg) -> TextEncoder:
    """The encoder an ``EncoderConfig`` names (``encoder.name``), built by its plugin's factory."""
    return make_encoder(registry().get("encoders", cfg.name, key="encoder.name"), cfg)


def get_benchmarks(names: list[str], data_root: str | Path | None = None) -> list[Benchmark]:
    """Instantiate registered benchmarks by name ('paper' = the ten of the T2L paper, 'all')."""
    reg = registry()
    expanded: list[str] = []
    for name in names:
        if name == "paper":
            expanded += PAPER_BENCHMARKS
        elif name == "all":
            expanded += reg.names("benchmarks")
        else:
            expanded.append(name)
    out = []
    for name in dict.fromkeys(expanded):
        bench = reg.get("benchmarks", name, key="--benchmarks")(data_root)
        if not isinstance(bench, Benchmark):
            raise T2LError(f"benchmark '{name}': its plugin built {type(bench).__name__}, not a "
                           "t2l_framework.eval.benchmarks.Benchmark")
        bench.name = name  # the registered name is the one results are reported under
        out.append(bench)
    return out


def check_names(cfg: DictConfig, origin: str, import_code: bool = False, untrusted: bool = False) -> None:
    """Every plugin name a recipe uses is registered (head, encoder, family, benchmarks).
    untrusted (a run folder's recipe): the error names the key, not the name found there."""
    reg = registry()

    def get(kind: str, name: str, key: str, **kwargs) -> None:
        try:
            reg.get(kind, name, key=f"{origin}: {key}", **kwargs)
        except T2LError:
            if not untrusted:
                raise
            raise T2LError(f"{origin}: {key}: not a registered {kind[:-1].replace('_', ' ')}; "
                           "`t2l plugins` lists them") from None

    get("heads", cfg.hypernet.head, "hypernet.head", import_code=import_code)
    get("encoders", cfg.encoder.name, "encoder.name")
    if cfg.base_model.family != "auto":
        get("base_models", cfg.base_model.family, "base_model.family")
    for name in cfg.eval.benchmarks:
        if name not in ("paper", "all"):
            get("benchmarks", name, "eval.benchmarks")


def load_recipe(path_or_name: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = True, import_code: bool = False, untrusted: bool = False) -> DictConfig:
    """``config.load_recipe`` with the plugin names checked against the registry and
    ``training.mode`` against the registered modes (untrusted: a run folder's recipe, whose errors
    never quote its values and whose interpolations are refused)."""
    return recipes.load_recipe(path_or_name, overrides, check_files=check_files, check_names=check_names,
                               import_code=import_code, untrusted=untrusted, modes=registered_modes())


def registered(kind: str) -> Mapping[str, object]:
    """name -> component of one registry kind (for listings)."""
    reg = registry()
    return {name: reg.get(kind, name) for name in reg.names(kind)}
