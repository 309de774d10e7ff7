"""``HyperNetwork``: task embeddings -> LoRA factors of every targeted module of every layer.

One forward computes all (sample, module type, layer) rows in a single trunk pass, then
calls the head once per module type (module types differ in shape; layers and samples never
go through a Python loop); the head finishes the trunk for its rows (see ``HypernetHead``).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Callable

import torch
from torch import nn

from t2l_framework.config import HypernetConfig, LoraConfig
from t2l_framework.errors import T2LError, did_you_mean
from t2l_framework.hypernet.heads import BUILTIN_HEADS, HypernetHead
from t2l_framework.hypernet.trunk import Trunk

Z_SCORE_STD_EPS = 1e-10  # added to the library's std, as the reference does (convert_to_raw_scale, recon_trainer)
from t2l_framework.lora.weights import LoraWeights, ModuleShapes

HeadLookup = Callable[[str], type]  # hypernet.head name -> HypernetHead subclass


def builtin_head(name: str) -> type:
    """The built-in head class called ``name``; the assembly layer passes a lookup that also
    knows plugin heads and import paths."""
    if name not in BUILTIN_HEADS:
        raise T2LError(f"hypernet.head: unknown head '{name}'{did_you_mean(name, BUILTIN_HEADS)}; built-in heads: "
                       f"{', '.join(BUILTIN_HEADS)} (plugin heads and import paths resolve through t2l_framework.assembly)")
    return BUILTIN_HEADS[name]


def build_head(name: str, hypernet_cfg: dict, shapes: ModuleShapes, rank: int, trunk_width: int,
               heads: HeadLookup | None = None) -> HypernetHead:
    """The head called ``name``, resolved by ``heads`` (default: built-ins only) and built by its
    ``from_config`` from the ``hypernet`` section ``hypernet_cfg``."""
    cls = (heads or builtin_head)(name)
    if not (isinstance(cls, type) and issubclass(cls, HypernetHead)):
        raise T2LError(
            f"hypernet.head: '{name}' resolves to {cls!r}, which is not a subclass of "
            "t2l_framework.HypernetHead"
        )
    return cls.from_config(hypernet_cfg, shapes, rank, trunk_width)


class HyperNetwork(nn.Module):
    """Trunk + head, generating a whole adapter per task embedding.

    shapes: which modules get LoRAs and their (in, out) features; enc_dim: task-embedding
    width. hypernet_cfg / lora_cfg: a ``HypernetConfig`` / ``LoraConfig`` (None: the defaults;
    ``from_recipe`` converts a loaded recipe's sections, a checkpoint its JSON). base_model, encoder: recorded in checkpoints so generation uses the same
    base model and encoder (encoder: dict with name, model, prefix, normalize, pooling).
    heads: name -> head class (``t2l_framework.assembly.head_lookup`` knows plugins and import
    paths); default: the built-in heads.
    """

    def __init__(self, shapes: ModuleShapes, enc_dim: int, hypernet_cfg: HypernetConfig | None = None,
                 lora_cfg: LoraConfig | None = None, base_model: str = "", encoder: dict | None = None,
                 heads: HeadLookup | None = None):
        super().__init__()
        hypernet_cfg, lora_cfg = hypernet_cfg or HypernetConfig(), lora_cfg or LoraConfig()
        for name, value, cls in (("hypernet_cfg", hypernet_cfg, HypernetConfig), ("lora_cfg", lora_cfg, LoraConfig)):
            if not isinstance(value, cls):  # a programming error: convert where the config comes in
                raise TypeError(f"HyperNetwork {name} must be a {cls.__name__}, not {type(value).__name__} "
                                f"(a loaded recipe: HyperNetwork.from_recipe; a dict: {cls.__name__}(**d))")
        self.shapes = shapes
        self.enc_dim = int(enc_dim)
        self.hypernet_cfg = asdict(hypernet_cfg)  # what a checkpoint records and a head's from_config reads
        self.rank, self.alpha = int(lora_cfg.rank), float(lora_cfg.alpha)
        self.use_rslora = bool(lora_cfg.use_rslora)
        self.target_modules = list(lora_cfg.target_modules)
        if set(self.target_modules) != set(shapes.modules):
            raise T2LError(
                f"lora.target_modules {self.target_modules} do not match the base model's targeted "
                f"modules {shapes.modules}"
            )
        self.base_model = base_model
        self.encoder_meta = dict(encoder or {})
        hc = self.hypernet_cfg
        self.head_name = str(hc["head"])
        self.trunk = Trunk.from_config(hypernet_cfg, self.enc_dim, shapes.n_layers, len(shapes.modules))
        self.head = build_head(self.head_name, hc, shapes, self.rank, self.trunk.width, heads)
        self.register_buffer("layer_idx", torch.arange(shapes.n_layers), persistent=False)
        self.register_buffer("module_idx", torch.arange(len(shapes.modules)), persistent=False)
        self.output_offset = None
        if hc.get("output_offset"):
            self.set_output_offset(None)
        self.output_scale = None
        if hc.get("output_scale"):
            self.set_output_standardisation(None)

    def set_output_offset(self, weights: LoraWeights | None) -> None:
        """Add a fixed LoRA to every generated adapter (buffers saved with the weights).

        weights: batch-1 ``LoraWeights`` for this network's shapes and rank at most ``self.rank``
        (e.g. a multi-task LoRA), or None for zeros (a checkpoint's offset is then loaded into
        them). Stored in this network's scaling, so the applied delta W is the adapter's own.
        """
        offset = nn.Module()
        if weights is not None:
            if weights.batch_size != 1:
                raise T2LError(f"an output offset is one LoRA, got a batch of {weights.batch_size}")
            weights = weights.conform(self.shapes, self.rank)  # scaling folded into B: 1.0
            scaling = self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
        for i, (m, (fan_in, fan_out)) in enumerate(self.shapes.shapes.items()):
            a = torch.zeros(self.shapes.n_layers, self.rank, fan_in)
            b = torch.zeros(self.shapes.n_layers, fan_out, self.rank)
            if weights is not None:
                a, b = weights.A[m][0].detach().float().cpu(), weights.B[m][0].detach().float().cpu() / scaling
            offset.register_buffer(f"A{i}", a.contiguous())
            offset.register_buffer(f"B{i}", b.contiguous())
        device = self.layer_idx.device
        self.output_offset = offset.to(device)
        self.hypernet_cfg["output_offset"] = True

    def set_output_standardisation(self, library: LoraWeights | None) -> None:
        """The head emits z-scores: every generated A (B) is ``z x std + mean``, entry by entry,
        with the mean and std over a LoRA library's tasks (the reference's ``pred_z_score``).

        library: ``LoraWeights`` with one row per task, in this network's factor convention
        (what ``training.mode: recon`` regresses), or None for buffers of the right shape (mean 0,
        std 1) that a loaded checkpoint then fills. The mean becomes the output offset, the std (+ 1e-10, as the reference) the
        output scale; both are buffers saved with the weights. A z-score of 0 is the library's
        mean adapter, so a network that has not yet told tasks apart already emits it.
        """
        if library is not None:
            if library.batch_size < 2:
                raise T2LError(f"standardising the output needs a library of 2 or more LoRAs, got {library.batch_size}")
            if set(library.A) != set(self.shapes.modules):
                raise T2LError(f"the library's modules {sorted(library.A)} are not this network's {self.shapes.modules}")
        scale, offset = nn.Module(), nn.Module()
        for i, (m, (fan_in, fan_out)) in enumerate(self.shapes.shapes.items()):
            for name, shape, target in (("A", (self.shapes.n_layers, self.rank, fan_in), library and library.A[m]),
                                        ("B", (self.shapes.n_layers, fan_out, self.rank), library and library.B[m])):
                if target is None:
                    mean, std = torch.zeros(shape), torch.ones(shape)
                else:
                    if tuple(target.shape[1:]) != shape:
                        raise T2LError(f"the library's {m} {name} is {list(target.shape[1:])} per task, this network "
                                       f"emits {list(shape)}")
                    t = target.detach().float().cpu()
                    mean, std = t.mean(0), t.std(0) + Z_SCORE_STD_EPS
                offset.register_buffer(f"{name}{i}", mean.contiguous())
                scale.register_buffer(f"{name}{i}", std.contiguous())
        device = self.layer_idx.device
        self.output_offset, self.output_scale = offset.to(device), scale.to(device)
        self.hypernet_cfg["output_offset"] = self.hypernet_cfg["output_scale"] = True

    @classmethod
    def from_recipe(cls, recipe: Any, shapes: ModuleShapes, enc_dim: int,
                    heads: HeadLookup | None = None) -> "HyperNetwork":
        """Build from a loaded recipe (``load_recipe``) for a base model with ``shapes``."""
        from omegaconf import OmegaConf

        enc = recipe.encoder
        encoder = {"name": enc.name, "model": enc.model, "prefix": enc.prefix,
                   "normalize": bool(enc.normalize), "pooling": enc.pooling,
                   "normalize_scale": enc.normalize_scale, "full_stop": bool(enc.full_stop)}
        return cls(shapes, enc_dim, OmegaConf.to_object(recipe.hypernet), OmegaConf.to_object(recipe.lora),
                   base_model=recipe.base_model.name_or_path, encoder=encoder, heads=heads)

    @property
    def metadata(self) -> dict:
        """What this hypernetwork generates for, and from what."""
        return {"base_model": self.base_model, "encoder": self.encoder_meta, "head": self.head_name,
                "target_modules": self.target_modules, "rank": self.rank, "alpha": self.alpha,
                "use_rslora": self.use_rslora}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, task_emb: torch.Tensor) -> LoraWeights:
        """task_emb: [batch, enc_dim] -> LoraWeights with A[m]: [batch, n_layers, r, in_m] and
        B[m]: [batch, n_layers, out_m, r] for every targeted module type m."""
        if task_emb.dim() != 2 or task_emb.shape[1] != self.enc_dim:
            raise T2LError(f"task embeddings must be [batch, {self.enc_dim}], got {list(task_emb.shape)}")
        dtype = self.trunk.task_proj[0].weight.dtype
        feats = self.trunk(task_emb.to(dtype), self.layer_idx, self.module_idx)  # [M, batch, L, width]
        batch, n_layers = feats.shape[1], feats.shape[2]
        A, B = {}, {}
        for i, module in enumerate(self.shapes.modules):
            a, b = self.head(feats[i].flatten(0, 1), module, self.trunk)  # rows = batch * n_layers
            A[module], B[module] = a.unflatten(0, (batch, n_layers)), b.unflatten(0, (batch, n_layers))
            if self.output_scale is not None:  # [n_layers, ...] broadcast over the batch
                A[module] = A[module] * getattr(self.output_scale, f"A{i}").to(A[module].dtype)
                B[module] = B[module] * getattr(self.output_scale, f"B{i}").to(B[module].dtype)
            if self.output_offset is not None:
                A[module] = A[module] + getattr(self.output_offset, f"A{i}").to(A[module].dtype)
                B[module] = B[module] + getattr(self.output_offset, f"B{i}").to(B[module].dtype)
        return LoraWeights(A, B, self.rank, self.alpha, self.use_rslora)

    def save_pretrained(self, directory) -> None:
        """Write ``hypernet.safetensors`` + ``hypernet_config.json`` to ``directory``."""
        from t2l_framework.hypernet.checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, expect_base_model: str | None = None, expect_rank: int | None = None,
                        device: str | torch.device = "cpu", heads: HeadLookup | None = None) -> "HyperNetwork":
        """Load a checkpoint written by ``save_pretrained``; refuse one made for another base
        model or rank when ``expect_base_model`` / ``expect_rank`` are given."""
        from t2l_framework.hypernet.checkpoint import load_pretrained

        return load_pretrained(cls, directory, expect_base_model, expect_rank, device, heads)

    def load_weights(self, path) -> None:
        """Load a ``hypernet.safetensors`` file; missing, unexpected or mis-shaped keys -> T2LError."""
        from t2l_framework.hypernet.checkpoint import load_weights

        load_weights(self, path)
