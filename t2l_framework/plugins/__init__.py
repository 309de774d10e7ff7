"""Pluggy hook specifications and the plugin manager."""

from t2l_framework.plugins.hookspecs import hookimpl
from t2l_framework.plugins.manager import Registry, import_object, registry

__all__ = ["hookimpl", "registry", "Registry", "import_object"]
