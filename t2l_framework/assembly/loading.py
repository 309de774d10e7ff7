"""Building the pieces of a run: base model + LoRA injection, and a trained run's adapter
generator, for fit, eval, generate and serve alike.

The base model's family is resolved once (``load_base_model`` from the registered families)
and that same family is handed to ``inject_lora``, so target discovery never looks it up again.
Nothing in a run folder runs as code unless ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf

from t2l_framework.assembly.hub import resolve_run
from t2l_framework.assembly.lookups import build_encoder, head_lookup, load_recipe, model_families
from t2l_framework.config import BaseModelConfig, EncoderConfig
from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.hypernet.checkpoint import read_config
from t2l_framework.hypernet.hypernetwork import HyperNetwork
from t2l_framework.llm.loading import LoadedModel, load_base_model
from t2l_framework.lora.batched import LoraInjection, inject_lora
from t2l_framework.run_folder import HYPERNET_CONFIG, HYPERNET_WEIGHTS, RunFolder, locate_hypernet
from t2l_framework.runtime.adapters import AdapterGenerator
from t2l_framework.runtime.loaded import T2LRuntime

TRUST_HINT = "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust where this run came from"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(base_cfg, target_modules: Sequence[str], device: str | torch.device | None = None,
              runs_on: str | torch.device | None = None) -> tuple[LoadedModel, LoraInjection | None]:
    """The frozen base model of ``base_cfg`` (a ``BaseModelConfig``) and batched LoRA injected on
    ``target_modules`` (None when there are none), with the family resolved once for both."""
    base = load_base_model(base_cfg, device=device, say=say, runs_on=runs_on, families=model_families())
    injection = inject_lora(base.model, list(target_modules), base.family) if target_modules else None
    return base, injection


def check_run_trust(cfg, where, trust_remote_code: bool) -> None:
    """Refuse a run's recipe that would execute code (a model's custom modelling code, or a head
    named by import path) unless the user said they trust it: run folders are downloaded input."""
    if trust_remote_code or cfg is None:
        return
    for key in ("base_model.trust_remote_code", "encoder.trust_remote_code"):
        if OmegaConf.select(cfg, key, default=False):
            raise T2LError(f"{where}: {key} is true, so loading this run would execute Python code that ships "
                           f"with its model; {TRUST_HINT}")
    head = OmegaConf.select(cfg, "hypernet.head", default="")
    if ":" in str(head):
        raise T2LError(f"{where}: hypernet.head '{head}' is an import path, so loading this run would import and "
                       f"run that module; {TRUST_HINT}")


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_adapter_generator(folder: str | Path, device: str | torch.device,
                           trust_remote_code: bool = False, revision: str | None = None) -> AdapterGenerator:
    """The hypernetwork and encoder of a run folder (``recipe.yaml`` + ``hypernet/``), a bare
    hypernet folder, or a hub id (``ORG/NAME`` at ``revision``, through the Hub's cache); a bare
    folder takes the base model and encoder its config records.

    Nothing in the folder runs as code unless ``trust_remote_code``: a recipe asking for a
    model's custom code or a head named by import path is refused with the reason.
    """
    hyper_dir, recipe = locate_hypernet(resolve_run(folder, revision))
    config_file = hyper_dir / HYPERNET_CONFIG
    meta = read_config(hyper_dir)
    check_run_trust(OmegaConf.create({"hypernet": meta["hypernet"]}), config_file, trust_remote_code)
    if recipe is not None:
        # its data files belong to the machine it was trained on; untrusted: no values in errors, no ${...}
        cfg = load_recipe(recipe, check_files=False, untrusted=not trust_remote_code)
        check_run_trust(cfg, recipe, trust_remote_code)
        base_cfg, enc_cfg = cfg.base_model, cfg.encoder
    else:
        base_cfg = OmegaConf.structured(BaseModelConfig(name_or_path=meta["base_model"]))
        known = set(EncoderConfig.__dataclass_fields__)
        try:
            enc_cfg = OmegaConf.structured(EncoderConfig(**{k: v for k, v in meta["encoder"].items() if k in known}))
        except Exception as exc:  # noqa: BLE001 - OmegaConf's type errors, named for the user
            raise T2LError(f"{config_file}: 'encoder': {str(exc).splitlines()[0]}") from None
        check_run_trust(OmegaConf.create({"encoder": OmegaConf.to_container(enc_cfg)}), config_file,
                        trust_remote_code)
    if "normalize_scale" not in meta.get("encoder", {}):
        # Saved before task embeddings followed the reference (x sqrt(d), full stop): keep what it was trained on.
        enc_cfg = OmegaConf.merge(enc_cfg, {"normalize_scale": "unit", "full_stop": False})
    hypernet = HyperNetwork.from_pretrained(hyper_dir, expect_base_model=base_cfg.name_or_path, device=device,
                                            heads=head_lookup(import_code=trust_remote_code))
    encoder = build_encoder(enc_cfg).to(device)
    identity = _file_digest([config_file, hyper_dir / HYPERNET_WEIGHTS])
    name = RunFolder(hyper_dir.parent).name if recipe is not None else hyper_dir.resolve().name
    return AdapterGenerator(hypernet, encoder, identity, name, base_cfg, bool(base_cfg.chat_template))


def load_runtime(folder: str | Path, device: str | torch.device | None = None, dtype: str | None = "auto",
                 trust_remote_code: bool = False, revision: str | None = None) -> T2LRuntime:
    """A ``T2LRuntime`` for a run folder (``recipe.yaml`` + ``hypernet/``) or a bare hypernet folder.

    The recipe gives the base model and encoder settings; a bare hypernet folder falls back
    to what its ``hypernet_config.json`` records (base model name, encoder). dtype: the base
    model's weights: 'auto' = bfloat16 where the device does it natively, else float32
    (``llm/dtype.py``); None = the recipe's ``base_model.dtype``. trust_remote_code: see
    ``load_adapter_generator``; without it, opening a run never executes code from it. folder
    may be a hub id (``ORG/NAME``), downloaded at ``revision`` into the Hub's cache.
    """
    device = torch.device(device) if device else default_device()
    generator = load_adapter_generator(folder, device, trust_remote_code, revision)
    return runtime_for(generator.base_config, device, dtype, generator)


def runtime_for(base_cfg, device: str | torch.device | None = None, dtype: str | None = "auto",
                generator: AdapterGenerator | None = None, target_modules: Sequence[str] = ()) -> T2LRuntime:
    """A ``T2LRuntime`` on the base model of ``base_cfg`` (a ``BaseModelConfig``), LoRA injected on
    the generator's targets (or ``target_modules`` when there is no generator)."""
    device = torch.device(device) if device else default_device()
    if dtype is not None:
        base_cfg = OmegaConf.merge(base_cfg, {"dtype": dtype})
    targets = generator.hypernet.target_modules if generator is not None else list(target_modules)
    base, injection = load_base(base_cfg, targets, device=device)
    return T2LRuntime(base, injection, generator, bool(base_cfg.chat_template), base.dtype.name)
