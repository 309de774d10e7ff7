"""Trainer strategies from the recipe: auto, ddp, DeepSpeed ZeRO 1/2/3 (also on CPU), and
``fsdp_base`` (DDP for the hypernetwork, the frozen base sharded with FSDP2; see ``sharding``).

ZeRO stage 1 / 2 checkpoints are safetensors like every other strategy's (``_safetensors_zero_class``).

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA. DeepSpeed itself runs ZeRO on
CPU with the gloo backend, so ``CPUDeepSpeedStrategy`` lifts the three CUDA-only checks;
that is what lets the test suite exercise the DeepSpeed path on a laptop or in CI.

DeepSpeed (any stage) and plain DDP only ever see the hypernetwork: the base model is no
submodule of the LightningModule, so every rank holds all of it. ``fsdp_base`` is the one
strategy that splits the base across ranks.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from t2l_framework import config
from t2l_framework.errors import T2LError

# name -> (ZeRO stage, offload), read off the schema's trainer.strategy names ("deepspeed_stage_2_offload").
DEEPSPEED_STRATEGIES = {name: (int(name.split("_")[2]), name.endswith("_offload"))
                        for name in config.DEEPSPEED_STRATEGIES}


def _require_deepspeed(name: str) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise T2LError(
            f"trainer.strategy={name} needs DeepSpeed, which is not installed; "
            "install it with: pip install 't2l-framework[deepspeed]'"
        ) from None


def _safetensors_zero_class():
    """A mixin for ``DeepSpeedStrategy``: ZeRO stage 1 / 2 checkpoints as one safetensors file
    (``checkpoint_io``) instead of DeepSpeed's torch pickles, exact to resume.

    On save every rank takes part in gathering, per trainable parameter, its fp32 master weight
    and its optimizer state (``deepspeed.utils.safe_get_full_*``: the partitions all-reduced into
    whole tensors); rank 0 writes a Lightning checkpoint whose ``state_dict`` holds the masters and
    whose ``optimizer_states`` hold those tensors by parameter name, the base optimizer's step and
    hyperparameters and the engine's step counters. On load every rank reads the file and writes
    its own partitions back (``safe_set_full_*``). Whole tensors by name: nothing in the file
    depends on the world size. Stage 3 keeps DeepSpeed's own checkpoints (docs/security.md).
    """
    import torch
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                 safe_set_full_fp32_param, safe_set_full_optimizer_state)

    from t2l_framework.training.checkpoint_io import load_checkpoint_file, save_checkpoint_file

    class SafetensorsZeroCheckpoints:
        def _ours(self) -> bool:
            return not self.zero_stage_3

        def _trainable(self):
            return [(n, p) for n, p in self.lightning_module.named_parameters() if p.requires_grad]

        def _flat_partitions(self):
            """The ZeRO optimizer's fp32 partitions: the parameters its base optimizer steps."""
            return self.deepspeed_engine.optimizer.single_partition_of_fp32_groups

        def lightning_module_state_dict(self):
            state = super().lightning_module_state_dict()
            if self._ours():  # the fp32 masters, not the module's (possibly 16-bit) copies
                state.update({n: safe_get_full_fp32_param(p).detach().cpu() for n, p in self._trainable()})
            return state

        def optimizer_state(self, optimizer):
            if not self._ours():
                return super().optimizer_state(optimizer)
            zero = self.deepspeed_engine.optimizer
            base = zero.optimizer
            first = base.state.get(self._flat_partitions()[0], {})
            keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0)
            engine = self.deepspeed_engine
            return {
                "zero_consolidated": True,
                "state": {n: {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}
                          for n, p in self._trainable()},
                "step": [float(base.state.get(flat, {}).get("step", 0)) for flat in self._flat_partitions()],
                # torch's AdamW keeps its step as a tensor, DeepSpeed's CPU Adam (offload) as an int
                "step_is_tensor": [torch.is_tensor(base.state.get(flat, {}).get("step", torch.zeros(())))
                                   for flat in self._flat_partitions()],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
                "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                           "skipped_steps": int(engine.skipped_steps)},
            }

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            if not self._ours():
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            filepath = self.broadcast(filepath)
            if self.is_global_zero:
                save_checkpoint_file(checkpoint, filepath)
            self.barrier("t2l_zero_checkpoint")

        def load_checkpoint(self, checkpoint_path, weights_only=None):
            if not self._ours():
                return super().load_checkpoint(checkpoint_path, weights_only)
            return load_checkpoint_file(checkpoint_path)

        def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
            if not self._ours():
                return super().load_model_state_dict(checkpoint, strict)
            state = checkpoint["state_dict"]
            self.lightning_module.load_state_dict(state, strict=strict)
            for n, p in self._trainable():
                safe_set_full_fp32_param(p, state[n].to(torch.float32))

        @property
        def lightning_restore_optimizer(self) -> bool:
            return self._ours() or super().lightning_restore_optimizer

        def load_optimizer_state_dict(self, checkpoint) -> None:
            if not self._ours():
                return super().load_optimizer_state_dict(checkpoint)
            saved = checkpoint["optimizer_states"][0]
            zero = self.deepspeed_engine.optimizer
            base = zero.optimizer
            keys = next(iter(saved["state"].values()), {}).keys()
            for flat, step, as_tensor in zip(self._flat_partitions(), saved["step"], saved["step_is_tensor"]):
                # the base optimizer creates its state at its first step: give it one to fill
                slot = base.state[flat]
                slot["step"] = torch.tensor(step, dtype=torch.float32) if as_tensor else int(step)
                for k in keys:
                    slot.setdefault(k, torch.zeros_like(flat))
            for g, group in zip(base.param_groups, saved["param_groups"]):
                g.update(group)
            zero._lazy_init_hp_params_optimizer_state()  # link each parameter to its fragments
            for n, p in self._trainable():
                for k, v in saved["state"][n].items():
                    safe_set_full_optimizer_state(p, v.to(torch.float32), k)
            engine = self.deepspeed_engine
            for k, v in saved["engine"].items():
                setattr(engine, k, v)

    return SafetensorsZeroCheckpoints


def _cpu_deepspeed_class():
    import deepspeed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
    from lightning.fabric.utilities.seed import reset_seed

    @contextlib.contextmanager
    def _cpu_device_rank():
        """deepspeed.initialize wants device_rank=-1 (not None) when the device has no index."""
        original = deepspeed.initialize

        def initialize(*args, **kwargs):
            ns = kwargs.get("args")
            if isinstance(ns, argparse.Namespace) and getattr(ns, "device_rank", None) is None:
                kwargs["args"] = argparse.Namespace(**{**vars(ns), "device_rank": -1})
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original

    class CPUDeepSpeedStrategy(_safetensors_zero_class(), DeepSpeedStrategy):
        """DeepSpeedStrategy without the CUDA-only checks (gloo backend, device_rank=-1)."""

        strategy_name = "deepspeed_cpu"

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _setup_model_and_optimizer(self, *args, **kwargs):
            with _cpu_device_rank():
                return super()._setup_model_and_optimizer(*args, **kwargs)

        def init_deepspeed(self) -> None:
            with _cpu_device_rank():
                super().init_deepspeed()

    return CPUDeepSpeedStrategy


def _sharded_base_class():
    from lightning.pytorch.strategies import DDPStrategy

    from t2l_framework.console import say
    from t2l_framework.training import sharding

    class ShardedBaseStrategy(DDPStrategy):
        """DDP for what the optimizer trains; the LightningModule's frozen ``base_model`` sharded
        across the same ranks with FSDP2 before DDP wraps the module (``sharding.shard_frozen_base``)."""

        strategy_name = sharding.STRATEGY

        def setup(self, trainer) -> None:
            base = getattr(self.lightning_module, "base_model", None)
            if base is not None:
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh(self.root_device.type, (self.world_size,))
                self._units = [u.module for u in sharding.shard_frozen_base(base, mesh)]
                held, full = sharding.local_param_bytes(base), sharding.param_bytes(base)
                say(f"rank {self.global_rank}: frozen base sharded over {self.world_size} ranks, "
                    f"{held / 2**20:.1f} of {full / 2**20:.1f} MiB here ({held / full:.1%})")
            super().setup(trainer)

        def on_validation_end(self) -> None:
            # FSDP2 roots keep their parameters gathered after a forward until a backward frees
            # them; validation has no backward, so free them here rather than hold them into training.
            for module in getattr(self, "_units", []):
                module.reshard()  # a no-op on units that are sharded already
            super().on_validation_end()

    return ShardedBaseStrategy


def _on_cpu(accelerator: str) -> bool:
    if accelerator == "auto":
        import torch

        return not torch.cuda.is_available()
    return accelerator == "cpu"


def build_strategy(name: str, accelerator: str, precision: str) -> Any:
    """A Lightning strategy object (or name) for ``trainer.strategy``."""
    from t2l_framework.training.sharding import STRATEGY as SHARDED_BASE

    if name == SHARDED_BASE:
        return _sharded_base_class()(process_group_backend="gloo" if _on_cpu(accelerator) else None)
    if name not in DEEPSPEED_STRATEGIES:
        return name
    _require_deepspeed(name)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    stage, offload = DEEPSPEED_STRATEGIES[name]
    on_cpu = _on_cpu(accelerator)
    cls = _cpu_deepspeed_class() if on_cpu else type("SafetensorsDeepSpeedStrategy",
                                                     (_safetensors_zero_class(), DeepSpeedStrategy), {})
    # Our batches come whole from the dataset (batch_size=None), so DeepSpeed cannot read the
    # micro-batch size off the loader; it only uses it for throughput logging.
    kwargs = dict(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
                  logging_batch_size_per_gpu=1)
    if on_cpu:
        kwargs["process_group_backend"] = "gloo"
    return cls(**kwargs)
