"""Base LLM loading (hub id | local folder | GGUF file), model families, target modules."""

from t2l_framework.llm.families import BUILTIN_FAMILIES, ModelFamily, find_family, get_family
from t2l_framework.llm.loading import LoadedModel, load_base_model
from t2l_framework.llm.targets import decoder_layers, find_targets, target_shapes

__all__ = ["BUILTIN_FAMILIES", "ModelFamily", "find_family", "get_family", "LoadedModel",
           "load_base_model", "decoder_layers", "find_targets", "target_shapes"]
