"""t2l-plugin-e5: registers the ``e5`` text encoder through the ``t2l`` entry-point group."""

from __future__ import annotations

from t2l_framework import hookimpl
from t2l_plugin_e5.encoder import DEFAULT_MODEL, QUERY_PREFIX, E5Encoder

__version__ = "0.1.0"
__all__ = ["E5Encoder", "DEFAULT_MODEL", "QUERY_PREFIX"]


@hookimpl
def t2l_register_encoders(register):
    register("e5", E5Encoder.from_config)
