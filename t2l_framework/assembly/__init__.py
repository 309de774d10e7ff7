"""The assembly layer: lookups by name and the building of a run's pieces, in one place.

``t2l fit``, ``t2l eval`` (``evaluate``), ``t2l generate`` and ``t2l serve`` build what they run
through here; the packages below (training, eval, serve, runtime, hypernet, lora, llm, encoders,
data) receive classes and instances and never look names up in the plugin registry.
"""

from t2l_framework.assembly.evaluate import Evaluation, evaluate
from t2l_framework.assembly.fit import RunPieces, build_pieces, fit
from t2l_framework.assembly.loading import (
    check_run_trust, default_device, load_adapter_generator, load_base, load_runtime, runtime_for,
)
from t2l_framework.assembly.lookups import build_encoder, get_benchmarks, head_lookup, load_recipe, model_families

__all__ = [
    "Evaluation", "evaluate", "RunPieces", "build_pieces", "fit", "check_run_trust", "default_device",
    "load_adapter_generator", "load_base", "load_runtime", "runtime_for", "build_encoder", "get_benchmarks",
    "head_lookup", "load_recipe", "model_families",
]
