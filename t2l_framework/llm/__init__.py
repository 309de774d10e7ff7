"""Base LLM loading (hub id | local folder | GGUF file) and model families."""

from t2l_framework.llm.families import BUILTIN_FAMILIES, ModelFamily, find_family, get_family
from t2l_framework.llm.loading import LoadedModel, load_base_model

__all__ = ["BUILTIN_FAMILIES", "ModelFamily", "find_family", "get_family", "LoadedModel", "load_base_model"]
