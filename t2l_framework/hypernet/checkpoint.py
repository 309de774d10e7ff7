"""Hypernetwork checkpoints: ``hypernet.safetensors`` + ``hypernet_config.json``, never pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from t2l_framework.errors import T2LError
from t2l_framework.lora.weights import ModuleShapes

WEIGHTS_NAME = "hypernet.safetensors"
CONFIG_NAME = "hypernet_config.json"
FORMAT = "t2l-hypernet"
FORMAT_VERSION = 1


def save_pretrained(model, directory) -> None:
    """Weights as safetensors and everything needed to rebuild ``model`` as JSON."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "base_model": model.base_model, "encoder": model.encoder_meta, "enc_dim": model.enc_dim,
        "shapes": model.shapes.to_dict(),
        "lora": {"rank": model.rank, "alpha": model.alpha, "use_rslora": model.use_rslora,
                 "target_modules": model.target_modules},
        "hypernet": model.hypernet_cfg,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _same_model(a: str, b: str) -> bool:
    """A hub id and a local folder of the same model count as the same base model."""
    norm = lambda s: str(s).rstrip("/").lower()  # noqa: E731
    return norm(a) == norm(b) or Path(norm(a)).name == Path(norm(b)).name


def read_config(directory) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise T2LError(f"{directory}: not a hypernetwork checkpoint (no {CONFIG_NAME})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise T2LError(f"{path}: malformed JSON: {exc}") from None
    if config.get("format") != FORMAT:
        raise T2LError(f"{path}: not a t2l hypernetwork config (format={config.get('format')!r})")
    return config


def load_pretrained(cls, directory, expect_base_model=None, expect_rank=None, device="cpu"):
    config = read_config(directory)
    if expect_base_model is not None and not _same_model(config["base_model"], expect_base_model):
        raise T2LError(
            f"{directory}: this hypernetwork was trained for base model '{config['base_model']}', "
            f"not '{expect_base_model}'; its LoRAs do not fit another model"
        )
    rank = config["lora"]["rank"]
    if expect_rank is not None and int(expect_rank) != int(rank):
        raise T2LError(f"{directory}: this hypernetwork generates rank-{rank} LoRAs, not rank {expect_rank}")
    # Checkpoints from before rsLoRA was recorded were trained with alpha / r.
    lora = {"use_rslora": False, **config["lora"]}
    model = cls(ModuleShapes.from_dict(config["shapes"]), config["enc_dim"], config["hypernet"],
                lora, base_model=config["base_model"], encoder=config["encoder"])
    load_weights(model, Path(directory) / WEIGHTS_NAME)
    return model.to(device).eval()


def load_weights(model, path) -> None:
    """Strict load: every key present, no extra keys, every shape right, else T2LError."""
    path = Path(path)
    if not path.exists():
        raise T2LError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise T2LError(f"{path}: cannot read safetensors: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"{label}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else ""))
        raise T2LError(f"{path}: weights do not match this hypernetwork ({'; '.join(parts)})")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
