"""The frozen base model sharded across ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under ``trainer.strategy: fsdp_base`` every rank keeps only its slice (dim 0, 1/world of the rows)
of every base parameter. FSDP2 all-gathers one unit's parameters just before the unit runs, in
forward and again in backward (the LoRA path needs input gradients through every layer), and
frees them after; the base has no weight gradients, so nothing is reduce-scattered. The
hypernetwork stays replicated under DDP: it is small next to the base, and it is all that
optimizer states and checkpoints hold.

Units (one all-gather each): every decoder layer; the backbone's other parameters (input
embeddings, final norm); the output embeddings. The training step calls the backbone and the
output layer separately (logits only where there are labels), so those two are separate FSDP
roots. A root keeps its parameters gathered from its forward to the end of its backward, which
is what lets tied output embeddings read the input embeddings' gathered weight at call time.

``plan_rank_bytes`` computes what each rank will hold from parameter shapes alone, so it
works on the ``meta`` device (a 70B plan without allocating a byte).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from t2l_framework.config import SHARDED_BASE_STRATEGY
from t2l_framework.errors import T2LError
from t2l_framework.lora.targets import decoder_layers
from t2l_framework.training.modes import mode_class

STRATEGY = SHARDED_BASE_STRATEGY  # trainer.strategy naming this one


@dataclass
class ShardUnit:
    """One FSDP2 unit: ``module`` and the parameters it manages (those of no unit below it)."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]


def _tied(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def shard_units(model: nn.Module) -> list[ShardUnit]:
    """The units of a causal LM, innermost first (the order ``fully_shard`` must see them).

    Raises ``T2LError`` naming a parameter that no unit would shard (a model laid out unlike
    decoder layers + backbone + output embeddings)."""
    path, layers = decoder_layers(model)
    backbone = getattr(model, model.base_model_prefix, None)
    if not isinstance(backbone, nn.Module):
        raise T2LError(f"{type(model).__name__}: no backbone '{model.base_model_prefix}' to shard the base around")
    modules = [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]
    modules.append((model.base_model_prefix, backbone))
    out = model.get_output_embeddings()
    if out is not None and not _tied(model):
        name = next(n for n, m in model.named_modules() if m is out)
        modules.append((name, out))
    seen: set[int] = set()
    units = []
    for name, module in modules:  # innermost first: a unit manages what no inner unit took
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        units.append(ShardUnit(name, module, params))
    left = [n for n, p in model.named_parameters() if id(p) not in seen]
    if left:
        raise T2LError(f"cannot shard {type(model).__name__}: parameter '{left[0]}' lies outside its decoder "
                       f"layers, backbone and output embeddings; use trainer.strategy=ddp for this model")
    return units


def _shard_bytes(p: torch.Tensor, world_size: int) -> int:
    """Bytes of one rank's shard as FSDP2 stores it: dim 0 padded to a multiple of world_size."""
    rows = p.shape[0] if p.dim() else 1
    per_row = p.numel() // rows if rows else 0
    return math.ceil(rows / world_size) * per_row * p.element_size()


def plan_rank_bytes(model: nn.Module, world_size: int) -> list[int]:
    """Parameter bytes each of ``world_size`` ranks will hold once sharded (index = rank).

    Shapes only (``meta`` works); every rank holds the same padded size under FSDP2's dim-0 split."""
    if world_size < 1:
        raise T2LError(f"world size must be at least 1, got {world_size}")
    per_rank = sum(_shard_bytes(p, world_size) for unit in shard_units(model) for p in unit.params)
    return [per_rank] * world_size


def param_bytes(model: nn.Module) -> int:
    """Bytes of all the base's parameters, unsharded (a sharded parameter counts its full shape)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds: its shards (with FSDP2's padding) and any
    unsharded parameter in full."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.untyped_storage().nbytes()
    return total


def _retie_output_embeddings(model: nn.Module) -> None:
    """Make tied output embeddings read the input embeddings' weight at every access: the shard
    at rest, the gathered weight while the backbone (an FSDP root) holds it, from its forward to
    the end of its backward. FSDP2 swaps the parameter on the embedding module only, so a plain
    shared reference would keep the full weight alive."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    del out._parameters["weight"]
    tied = type(f"Tied{type(out).__name__}", (type(out),), {"weight": property(lambda self: emb.weight)})
    out.__class__ = tied


def shard_frozen_base(model: nn.Module, mesh) -> list[ShardUnit]:
    """Shard ``model`` (frozen: no parameter may require grad) over ``mesh``, a 1-D DeviceMesh of
    every rank; shards move to the mesh's device. Call after LoRA injection: the wrappers sit
    inside decoder layers and are sharded with them. Returns the units."""
    from torch.distributed.fsdp import fully_shard

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise T2LError(f"{STRATEGY} shards a frozen base, but base parameter '{trainable[0]}' requires grad")
    tied = _tied(model)
    units = shard_units(model)
    for unit in units:
        fully_shard(unit.module, mesh=mesh)
    if tied:
        _retie_output_embeddings(model)
    return units


def check_sharded_recipe(cfg) -> None:
    """Refuse settings that would hang a sharded base: every rank must run every base forward.

    Greedy decoding stops when a rank's answers are done, at a different step on each rank; the
    end-of-training report runs on rank 0 alone."""
    if cfg.trainer.strategy != STRATEGY:
        return
    if bool(cfg.training.compile):
        raise T2LError(f"training.compile=true with trainer.strategy={STRATEGY}: compiling a base whose layers FSDP2 "
                       "gathers and frees is not supported here; set training.compile=false")
    if not mode_class(str(cfg.training.mode)).needs_base_model:
        raise T2LError(f"trainer.strategy={STRATEGY} shards the base model, but training.mode={cfg.training.mode} "
                       "uses none; use trainer.strategy=ddp")
    if int(cfg.eval.val_generation_batches) > 0:
        raise T2LError(f"eval.val_generation_batches={cfg.eval.val_generation_batches} with trainer.strategy="
                       f"{STRATEGY}: greedy decoding ends at a different step on each rank, and a sharded base needs "
                       "every rank in every forward; set eval.val_generation_batches=0")
    if bool(cfg.eval.final_report):
        raise T2LError(f"eval.final_report=true with trainer.strategy={STRATEGY}: the report decodes on rank 0 "
                       "alone, which a sharded base cannot do; set eval.final_report=false and run `t2l eval` "
                       "on the saved run")
