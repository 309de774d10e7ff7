"""Plugin loading (pluggy, entry-point group ``t2l``) and the registries it fills.

``registry()`` is the single place the rest of the framework asks for components by name.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from t2l_framework.errors import T2LError, did_you_mean
from t2l_framework.plugins import hookspecs

KINDS = ("encoders", "heads", "base_models", "benchmarks")
ENTRY_POINT_GROUP = "t2l"
BUILTIN = "t2l_framework.plugins.builtin"


@dataclass
class PluginInfo:
    name: str
    source: str  # "built-in" or "entry point <module>"
    version: str | None = None
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Registry:
    """Registered components per kind, and which plugin provided each name."""

    components: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: {} for k in KINDS})
    owners: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    plugins: list[PluginInfo] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str, key: str | None = None, import_code: bool = False) -> Any:
        """Component ``name`` of ``kind``; heads may also be ``module.path:ClassName``.

        import_code=False (the default: importing runs code, so a caller must ask for it) checks
        an import path without running the module (it is only looked up on ``sys.path``) and
        returns None for it: what ``t2l validate`` does by default.
        """
        if kind == "heads" and ":" in name:
            return import_object(name, key or "hypernet.head", execute=import_code)
        try:
            return self.components[kind][name]
        except KeyError:
            where = f"{key}: " if key else ""
            label = kind[:-1].replace("_", " ")
            raise T2LError(
                f"{where}unknown {label} '{name}'{did_you_mean(name, self.components[kind])}; "
                f"expected one of: {', '.join(self.names(kind)) or '(none registered)'}"
            ) from None


_CWD_HINT = " (the current folder is not searched: PYTHONPATH=. adds it)"


def import_object(path: str, key: str = "value", execute: bool = True) -> Any:
    """Import ``package.module:Attribute`` with a clear error naming the recipe key.

    Only ``sys.path`` is searched, never the current folder: a downloaded run opened from its
    own folder must not import a module that sits next to it. execute=False only checks that
    the top-level package can be found (finding runs no code) and returns None.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise T2LError(f"{key}: '{path}' is not an import path of the form 'package.module:ClassName'")
    if not execute:
        top = module_name.split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise T2LError(f"{key}: cannot import module '{module_name}': no module named '{top}' on the "
                           f"Python path{_CWD_HINT}")
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
        hint = _CWD_HINT if isinstance(exc, ModuleNotFoundError) else ""
        raise T2LError(f"{key}: cannot import module '{module_name}': {exc}{hint}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise T2LError(
            f"{key}: module '{module_name}' has no attribute '{attr}'{did_you_mean(attr, dir(module))}"
        ) from None


def _allowed_plugins() -> set[str] | None:
    value = os.environ.get("T2L_PLUGINS")
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _make_register(reg: Registry, staged: dict[str, dict[str, Any]], kind: str,
                   info: PluginInfo) -> Callable[[str, Any], None]:
    """``register(name, obj)`` for one plugin and kind: it fills ``staged`` (this plugin's own,
    not yet in ``reg``), so a plugin that fails later leaves nothing behind."""

    def register(name: str, obj: Any) -> None:
        owner = reg.owners[kind].get(name) or (info.name if name in staged[kind] else None)
        if owner is not None:
            raise T2LError(
                f"{kind[:-1].replace('_', ' ')} '{name}' is registered twice: "
                f"by plugin '{owner}' and by plugin '{info.name}'"
            )
        staged[kind][name] = obj

    return register


def _register_plugin(pm: pluggy.PluginManager, reg: Registry, info: PluginInfo) -> None:
    """Run every ``t2l_register_*`` hook of one plugin; its registrations enter ``reg`` only when
    all of them succeed (all or nothing), else the plugin is reported and skipped."""
    plugin = pm.get_plugin(info.name)
    staged: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
    try:
        for kind in KINDS:
            impls = [i for i in getattr(pm.hook, f"t2l_register_{kind}").get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                impl.function(register=_make_register(reg, staged, kind, info))
    except T2LError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the rest down
        _report_failure(info, exc)
        return
    for kind, items in staged.items():
        for name, obj in items.items():
            reg.components[kind][name] = obj
            reg.owners[kind][name] = info.name
            info.registered.setdefault(kind, []).append(name)


def load_registry() -> Registry:
    """Load built-ins and entry-point plugins; broken plugins are reported once and skipped."""
    pm = pluggy.PluginManager("t2l")
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    infos: dict[str, PluginInfo] = {}

    pm.register(importlib.import_module(BUILTIN), name="builtin")
    infos["builtin"] = PluginInfo("builtin", "built-in", _version("t2l-framework"))

    allowed = _allowed_plugins()
    for ep in _entry_points():
        if allowed is not None and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        info = infos[ep.name] = PluginInfo(
            ep.name, f"entry point {ep.value}", dist.version if dist is not None else None
        )
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the rest down
            _report_failure(info, exc)

    for info in infos.values():  # built-ins first, then entry points by name: the order names are claimed in
        if not info.error:
            _register_plugin(pm, reg, info)
    reg.plugins = list(infos.values())
    return reg


def _report_failure(info: PluginInfo, exc: BaseException) -> None:
    info.error = f"{type(exc).__name__}: {exc}"
    print(f"t2l: plugin '{info.name}' failed to load and was skipped: {info.error}", file=sys.stderr)


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    seen, unique = set(), []
    for ep in sorted(eps, key=lambda e: e.name):
        if ep.name not in seen:  # the same dist can be visible twice on odd sys.paths
            seen.add(ep.name)
            unique.append(ep)
    return unique


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


_REGISTRY: Registry | None = None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = load_registry()
    return _REGISTRY
