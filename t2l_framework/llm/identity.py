"""Which base model a hypernetwork was trained for, recorded so that it is not told apart by name.

A name alone is not enough: two different local models both saved as ``model/`` have the same
folder name, and one hub id names many revisions. The identity records the name, the hub
revision (the commit of the local hub cache, when the model came from there) and a sha256 of
the model's architecture: its ``config.json`` (without keys that change with the tool that wrote
it or with a dtype conversion) and the tensor names of its weights index. It does not hash the
weights themselves (gigabytes): two fine-tunes of one architecture with equal configs share
that hash, and only their hub revisions (when both are hub models) tell them apart.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from t2l_framework.config import BaseModelConfig
from t2l_framework.errors import T2LError
from t2l_framework.llm.loading import resolve_source

# config.json keys that differ between copies of one model: who wrote it, where from, which dtype.
VOLATILE_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "use_cache",
                 "quantization_config"}
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def _tensor_names(folder: Path) -> list[str] | None:
    """Tensor names from the weights index, else from the safetensors headers (no tensor is read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file() and index.stat().st_size <= MAX_HEADER_BYTES:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted(weight_map) if isinstance(weight_map, dict) else None
    names: list[str] = []
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                return None
            names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return sorted(names) if files else None


def architecture_sha256(folder: str | Path) -> str | None:
    """sha256 of a model folder's canonical ``config.json`` and weight names; None without a config."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file() or config_file.stat().st_size > MAX_CONFIG_BYTES:
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        names = _tensor_names(folder)
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    canonical = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    text = json.dumps({"config": canonical, "weights": names}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _gguf_sha256(path: Path) -> str:
    """A GGUF file: its size and first MiB (the metadata: architecture, shapes, tokenizer)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()


def base_model_identity(name_or_path: str, gguf_file: str | None = None) -> dict:
    """``{"name", "revision", "sha256"}`` of a base model as this machine has it; revision and
    sha256 are None where they cannot be known (a hub model not in the local cache)."""
    identity = {"name": str(name_or_path), "revision": None, "sha256": None}
    try:
        source, gguf = resolve_source(BaseModelConfig(name_or_path=str(name_or_path), gguf_file=gguf_file))
    except T2LError:
        return identity
    folder = Path(source)
    if not folder.is_dir():  # a hub id: the local cache knows its commit, if it was downloaded
        folder = _hub_snapshot(source, gguf or "config.json")
        if folder is None:
            return identity
        identity["revision"] = folder.name
    if gguf:
        identity["sha256"] = _gguf_sha256(folder / gguf) if (folder / gguf).is_file() else None
    else:
        identity["sha256"] = architecture_sha256(folder)
    return identity


def _hub_snapshot(repo_id: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: the identity is the name alone
        return None
    return Path(found).parent if isinstance(found, str) else None
