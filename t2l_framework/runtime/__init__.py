"""A loaded run: adapter generation (``AdapterGenerator``), chat (``T2LRuntime``) and the
greedy decoder that training's validation, evaluation and serving share (``greedy_decode``)."""

from t2l_framework.runtime.adapters import AdapterGenerator
from t2l_framework.runtime.greedy import greedy_decode, greedy_generate, left_pad
from t2l_framework.runtime.loaded import Completion, T2LRuntime

__all__ = ["AdapterGenerator", "Completion", "T2LRuntime", "greedy_decode", "greedy_generate", "left_pad"]
