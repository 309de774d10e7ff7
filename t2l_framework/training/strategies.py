"""Trainer strategies from the recipe: auto, ddp, DeepSpeed ZeRO 1/2/3 (also on CPU), and
``fsdp_base`` (DDP for the hypernetwork, the frozen base sharded with FSDP2; see ``sharding``).

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

from t2l_framework.errors import T2LError

DEEPSPEED_STRATEGIES = {
    "deepspeed_stage_1": (1, False),
    "deepspeed_stage_2": (2, False),
    "deepspeed_stage_2_offload": (2, True),
    "deepspeed_stage_3": (3, False),
    "deepspeed_stage_3_offload": (3, True),
}


def _require_deepspeed(name: str) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise T2LError(
            f"trainer.strategy={name} needs DeepSpeed, which is not installed; "
            "install it with: pip install 't2l-framework[deepspeed]'"
        ) from None


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

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
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
    cls = _cpu_deepspeed_class() if on_cpu else DeepSpeedStrategy
    # Our batches come whole from the dataset (batch_size=None), so DeepSpeed cannot read the
    # micro-batch size off the loader; it only uses it for throughput logging.
    kwargs = dict(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
                  logging_batch_size_per_gpu=1)
    if on_cpu:
        kwargs["process_group_backend"] = "gloo"
    return cls(**kwargs)
