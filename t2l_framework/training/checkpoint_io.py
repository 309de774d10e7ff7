"""Lightning checkpoints as safetensors: no pickle on disk, written atomically.

A Lightning checkpoint is a nested structure of dicts, lists and tuples whose leaves are
tensors or plain values (step counters, loop state, scheduler settings). Tensors go into
the safetensors payload under generated keys; everything else is encoded as JSON in the
file's metadata, so ``load_checkpoint`` rebuilds the exact structure without unpickling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

from t2l_framework.atomic import atomic_file
from t2l_framework.errors import T2LError

SKELETON_KEY = "t2l_checkpoint"
TEMP_SUFFIX = ".partial"  # save_checkpoint_file's temporary files: ``.NAME.XXXXXXXX.partial``
# what a kill during a write leaves: ours, and the suffix-less names of earlier versions
_TORN = re.compile(r"^\..+\.ckpt\.[A-Za-z0-9_]{8}(\.partial)?$")


def remove_torn_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed midway; returns them.
    A complete checkpoint is only ever renamed into place, so these are never the last good one."""
    folder = Path(folder)
    torn = [p for p in folder.glob(".*") if p.is_file() and _TORN.match(p.name)] if folder.is_dir() else []
    for path in torn:
        path.unlink(missing_ok=True)
    return torn


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors, path), _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, torch.Size)) or type(obj) is tuple:
        items = [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
        return {"__list__": items} if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, tuple):  # named tuples
        return {"__tuple__": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint value at '{path}' has type {type(obj).__name__}, which cannot be stored without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            try:
                return tensors[obj["__tensor__"]]
            except (KeyError, TypeError):
                raise _Malformed(f"tensor '{obj['__tensor__']}' named in the metadata is missing") from None
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_decode(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return obj


def save_checkpoint_file(checkpoint: dict, path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(checkpoint, tensors, "checkpoint"))
    # safetensors refuses tensors that share memory; checkpoints may hold views of one buffer.
    tensors = {k: v.clone() if v.numel() else v for k, v in tensors.items()}
    with atomic_file(path, suffix=TEMP_SUFFIX) as tmp:
        save_file(tensors, tmp, metadata={SKELETON_KEY: skeleton})


class _Malformed(ValueError):
    """The metadata skeleton does not match the tensors (a doctored or foreign file)."""


def _skeleton(path: Path, metadata: dict) -> Any:
    if SKELETON_KEY not in metadata:
        raise T2LError(f"{path} is not a t2l-framework checkpoint (no '{SKELETON_KEY}' metadata)")
    try:
        return json.loads(metadata[SKELETON_KEY])
    except json.JSONDecodeError as exc:
        raise T2LError(f"cannot read checkpoint {path}: malformed metadata: {exc}") from None
    except RecursionError:
        raise T2LError(f"cannot read checkpoint {path}: metadata nested too deeply") from None


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict:
    """The checkpoint dict; a torn, foreign or doctored file -> one T2LError naming it."""
    path = Path(path)
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file must say which file
        raise T2LError(f"cannot read checkpoint {path}: {exc}") from None
    skeleton = _skeleton(path, metadata)
    try:
        checkpoint = _decode(skeleton, tensors)
    except (_Malformed, ValueError, TypeError, KeyError) as exc:
        raise T2LError(f"cannot read checkpoint {path}: {exc}") from None
    except RecursionError:
        raise T2LError(f"cannot read checkpoint {path}: metadata nested too deeply") from None
    if not isinstance(checkpoint, dict):
        raise T2LError(f"cannot read checkpoint {path}: not a checkpoint dict")
    return checkpoint


def checkpoint_step(path: str | Path) -> int:
    """The checkpoint's ``global_step``, read from the header only."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        skeleton = _skeleton(path, f.metadata() or {})
    return int(dict((k, v) for k, v in skeleton["__dict__"]).get("global_step", -1))


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that stores checkpoints as safetensors (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location or "cpu")

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
