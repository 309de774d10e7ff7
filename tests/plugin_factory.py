"""Build throwaway plugin distributions (a module + dist-info with a ``t2l`` entry point)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_plugin(site: Path, dist: str, module: str, body: str, entry_name: str | None = None,
                version: str = "1.0") -> Path:
    """Write ``module.py`` and ``<dist>-<version>.dist-info`` into ``site`` (a sys.path entry)."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[t2l]\n{entry_name or dist} = {module}\n")
    return site


GOOD_PLUGIN = """
from t2l_framework import hookimpl


def make_encoder(cfg):
    raise RuntimeError("only registered for the test")


@hookimpl
def t2l_register_encoders(register):
    register("fake_encoder", make_encoder)
"""

BROKEN_PLUGIN = """
raise ImportError("this plugin is broken on purpose")
"""

CLASHING_PLUGIN = """
from t2l_framework import hookimpl


@hookimpl
def t2l_register_encoders(register):
    register("transformers", lambda cfg: None)
"""
