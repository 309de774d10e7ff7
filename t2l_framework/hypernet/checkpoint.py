"""Hypernetwork checkpoints: ``hypernet.safetensors`` + ``hypernet_config.json``, never pickle."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from t2l_framework.atomic import atomic_file
from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.llm.identity import base_model_identity
from t2l_framework.lora.weights import ModuleShapes
from t2l_framework.run_folder import HYPERNET_CONFIG as CONFIG_NAME
from t2l_framework.run_folder import HYPERNET_WEIGHTS as WEIGHTS_NAME

FORMAT = "t2l-hypernet"
FORMAT_VERSION = 1


def save_pretrained(model, directory) -> None:
    """Weights as safetensors and everything needed to rebuild ``model`` as JSON.

    Atomic per file: both are written to temporary names first and renamed into place only when
    both are whole, so a failure while writing leaves the older checkpoint (or none), never a
    torn file; other files in ``directory`` are left alone."""
    out = Path(directory)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "base_model": model.base_model, "encoder": model.encoder_meta, "enc_dim": model.enc_dim,
        "base_model_identity": base_model_identity(model.base_model),
        "shapes": model.shapes.to_dict(),
        "lora": {"rank": model.rank, "alpha": model.alpha, "use_rslora": model.use_rslora,
                 "target_modules": model.target_modules},
        "hypernet": model.hypernet_cfg,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(out / CONFIG_NAME) as config_tmp, atomic_file(out / WEIGHTS_NAME) as weights_tmp:
        save_file(state, str(weights_tmp), metadata={"format": FORMAT})
        config_tmp.write_text(json.dumps(config, indent=2) + "\n")


def _same_name(a: str, b: str) -> bool:
    """By name alone (runs saved before identities were recorded): a hub id and a local folder
    of the same model count as the same base model, and so, wrongly, do two folders of one name."""
    norm = lambda s: str(s).rstrip("/").lower()  # noqa: E731
    return norm(a) == norm(b) or Path(norm(a)).name == Path(norm(b)).name


def _describe(identity: dict) -> str:
    parts = [f"revision {identity['revision'][:12]}"] if identity.get("revision") else []
    parts += [f"architecture sha256 {identity['sha256'][:12]}"] if identity.get("sha256") else []
    return ", ".join(parts) or "identity unknown"


def check_base_model(directory, config: dict, expected: str) -> None:
    """The base model ``expected`` (a recipe's ``name_or_path`` on this machine) is the one the
    checkpoint was trained for: compared by recorded identity (architecture hash, else hub
    revision), by name only where no identity is known, which is said."""
    recorded = config.get("base_model_identity")
    here = base_model_identity(expected)
    if recorded and recorded.get("sha256") and here["sha256"]:
        same = recorded["sha256"] == here["sha256"]
    elif recorded and recorded.get("revision") and here["revision"] and _same_name(recorded["name"], expected):
        same = recorded["revision"] == here["revision"]
    else:
        why = "this checkpoint records none (saved by an older version)" if not recorded else \
            f"'{expected}' is not on this machine yet"
        say(f"{directory}: base model compared by name only, without its identity: {why}")
        same = _same_name(config["base_model"], expected)
    if not same:
        raise T2LError(
            f"{directory}: this hypernetwork was trained for base model '{config['base_model']}', not "
            f"'{expected}' (recorded: {_describe(recorded or {})}; here: {_describe(here)}); its LoRAs do not fit "
            "another model"
        )


MAX_CONFIG_BYTES = 1 << 20  # a hypernet_config.json is a few kB
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REVISION = re.compile(r"[0-9a-f]{40}")  # a hub commit, as the local cache names its snapshots
_MAX_FEATURES = 1 << 20  # in/out features of one module: far above any released model
_MAX_LAYERS = 4096


def _expect(path: Path, where: str, value, kind, what: str):
    """``value`` if it is ``kind`` (bool never counts as a number), else one T2LError naming the key."""
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    raise T2LError(f"{path}: '{where}' must be {what}, got {value!r:.80}")


def _check_config(path: Path, config: dict) -> None:
    """Every key ``load_pretrained`` uses, with its type and a sane range, before anything is built."""
    from t2l_framework.config import value_problem

    for key, kind, what in (("base_model", str, "a string"), ("encoder", dict, "a mapping"),
                            ("enc_dim", int, "an integer"), ("shapes", dict, "a mapping"),
                            ("lora", dict, "a mapping"), ("hypernet", dict, "a mapping")):
        if key not in config:
            raise T2LError(f"{path}: missing key '{key}'; the file is incomplete or not written by save_pretrained")
        _expect(path, key, config[key], kind, what)
    if not 1 <= config["enc_dim"] <= 65536:
        raise T2LError(f"{path}: 'enc_dim' must be from 1 to 65536, got {config['enc_dim']}")
    shapes = config["shapes"]
    n_layers = _expect(path, "shapes.n_layers", shapes.get("n_layers"), int, "an integer")
    if not 1 <= n_layers <= _MAX_LAYERS:
        raise T2LError(f"{path}: 'shapes.n_layers' must be from 1 to {_MAX_LAYERS}, got {n_layers}")
    modules = _expect(path, "shapes.shapes", shapes.get("shapes"), dict, "a mapping of module -> [in, out]")
    for name, pair in modules.items():
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_FEATURES for v in pair)):
            raise T2LError(f"{path}: 'shapes.shapes.{name}' must be [in_features, out_features] from 1 to "
                           f"{_MAX_FEATURES}, got {pair!r:.80}")
    lora = config["lora"]
    for key in ("rank", "alpha", "target_modules"):
        if key not in lora:
            raise T2LError(f"{path}: missing key 'lora.{key}'")
    _expect(path, "lora.rank", lora["rank"], int, "an integer")
    _expect(path, "lora.alpha", lora["alpha"], (int, float), "a number")
    targets = _expect(path, "lora.target_modules", lora["target_modules"], list, "a list of module names")
    if not all(isinstance(t, str) for t in targets):
        raise T2LError(f"{path}: 'lora.target_modules' must be a list of module names")
    _expect(path, "hypernet.head", config["hypernet"].get("head", "per_layer"), str, "a head name")
    identity = config.get("base_model_identity")
    if identity is not None:
        _expect(path, "base_model_identity", identity, dict, "a mapping")
        _expect(path, "base_model_identity.name", identity.get("name"), str, "a string")
        for key, pattern in (("revision", _REVISION), ("sha256", _SHA256)):
            value = identity.get(key)
            if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
                raise T2LError(f"{path}: 'base_model_identity.{key}' must be null or {pattern.pattern}")
    for section in ("lora", "hypernet"):
        for key, value in config[section].items():
            problem = value_problem(f"{section}.{key}", value)
            if problem:
                raise T2LError(f"{path}: '{section}.{key}': {problem}")


def read_config(directory) -> dict:
    """``hypernet_config.json``, checked: one T2LError naming the file and key for anything malformed."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise T2LError(f"{directory}: not a hypernetwork checkpoint (no {CONFIG_NAME})")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise T2LError(f"{path}: {path.stat().st_size} bytes; a hypernetwork config is at most {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise T2LError(f"{path}: malformed JSON: {exc}") from None
    except RecursionError:
        raise T2LError(f"{path}: malformed JSON: nested too deeply") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise T2LError(f"{path}: not a t2l hypernetwork config (format={found!r})")
    _check_config(path, config)
    return config


def _build(cls, config: dict, lora: dict, heads):
    """The network ``config`` describes; its JSON sections become the config dataclasses here
    (keys the schema no longer has are ignored, missing ones take the defaults)."""
    from t2l_framework.config import HypernetConfig, LoraConfig

    known = {f.name for f in fields(HypernetConfig)}
    hypernet = HypernetConfig(**{k: v for k, v in config["hypernet"].items() if k in known})
    lora_cfg = LoraConfig(**{k: lora[k] for k in ("rank", "alpha", "use_rslora", "target_modules")})
    return cls(ModuleShapes.from_dict(config["shapes"]), config["enc_dim"], hypernet, lora_cfg,
               base_model=config["base_model"], encoder=config["encoder"], heads=heads)


def load_pretrained(cls, directory, expect_base_model=None, expect_rank=None, device="cpu", heads=None):
    """Rebuild and load a hypernetwork; shapes are checked against the safetensors header on the
    meta device first, so a doctored config cannot make us allocate what the file does not hold."""
    config = read_config(directory)
    if expect_base_model is not None:
        check_base_model(directory, config, expect_base_model)
    rank = config["lora"]["rank"]
    if expect_rank is not None and int(expect_rank) != int(rank):
        raise T2LError(f"{directory}: this hypernetwork generates rank-{rank} LoRAs, not rank {expect_rank}")
    # Checkpoints from before rsLoRA was recorded were trained with alpha / r.
    lora = {"use_rslora": False, **config["lora"]}
    weights = Path(directory) / WEIGHTS_NAME
    with torch.device("meta"):
        skeleton = _build(cls, config, lora, heads)  # no memory: shapes only
    _check_shapes({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, header_shapes(weights), weights)
    model = _build(cls, config, lora, heads)
    load_weights(model, weights)
    return model.to(device).eval()


def header_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise T2LError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise T2LError(f"{path}: cannot read safetensors: {exc}") from None


def _check_shapes(expected: dict[str, tuple], found: dict[str, tuple], path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {list(found[k])} != {list(v)}" for k, v in expected.items() if k in found and found[k] != v]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"{label}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else ""))
        raise T2LError(f"{path}: weights do not match this hypernetwork ({'; '.join(parts)})")


def load_weights(model, path) -> None:
    """Strict load: every key present, no extra keys, every shape right (checked on the header,
    before any tensor is read), else T2LError."""
    path = Path(path)
    _check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, header_shapes(path), path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise T2LError(f"{path}: cannot read safetensors: {exc}") from None
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
