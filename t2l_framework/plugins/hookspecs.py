"""The whole extension surface of t2l-framework: one hook per kind of component.

Each hook receives a ``register(name, obj)`` callable. Built-in components are registered
through these same hooks (see ``builtin.py``), so a third-party plugin is first-class.
"""

import pluggy

hookspec = pluggy.HookspecMarker("t2l")
hookimpl = pluggy.HookimplMarker("t2l")


@hookspec
def t2l_register_encoders(register):
    """Register text encoders: ``register(name, factory)``, factory(EncoderConfig) -> TextEncoder."""


@hookspec
def t2l_register_heads(register):
    """Register hypernetwork heads: ``register(name, HypernetHead subclass)``."""


@hookspec
def t2l_register_base_models(register):
    """Register base-model families: ``register(name, ModelFamily)`` (targets, chat format, loading)."""


@hookspec
def t2l_register_benchmarks(register):
    """Register evaluation benchmarks: ``register(name, Benchmark factory)``."""
