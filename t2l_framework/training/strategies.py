"""Trainer strategies from the recipe: auto, ddp, and DeepSpeed ZeRO 1/2/3 (also on CPU).

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA. DeepSpeed itself runs ZeRO on
CPU with the gloo backend, so ``CPUDeepSpeedStrategy`` lifts the three CUDA-only checks;
that is what lets the test suite exercise the DeepSpeed path on a laptop or in CI.
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


def build_strategy(name: str, accelerator: str, precision: str) -> Any:
    """A Lightning strategy object (or name) for ``trainer.strategy``."""
    if name not in DEEPSPEED_STRATEGIES:
        return name
    _require_deepspeed(name)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    stage, offload = DEEPSPEED_STRATEGIES[name]
    on_cpu = accelerator == "cpu"
    if accelerator == "auto":
        import torch

        on_cpu = not torch.cuda.is_available()
    cls = _cpu_deepspeed_class() if on_cpu else DeepSpeedStrategy
    # Our batches come whole from the dataset (batch_size=None), so DeepSpeed cannot read the
    # micro-batch size off the loader; it only uses it for throughput logging.
    kwargs = dict(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
                  logging_batch_size_per_gpu=1)
    if on_cpu:
        kwargs["process_group_backend"] = "gloo"
    return cls(**kwargs)
