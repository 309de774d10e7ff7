"""What every benchmark that loads a base model shares: ``--model`` / ``--dtype`` and loading it.

``--model`` is the offline demo model (SmolLM2-135M-Instruct) by default, or a local Hugging Face
folder, e.g. a random-weight stand-in with a 7B model's shapes built on the GPU machine
(``../shared/gpu-kit/mk_models.py``): the same figures can then be repeated at another scale.
Hub names are refused here: a benchmark never downloads a model.

    parser = argparse.ArgumentParser(...)
    add_model_args(parser)                      # --model, --dtype
    args = parser.parse_args()
    runtime = load_model(args, ["q_proj", "v_proj"], device)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

DEMO_MODEL = "smollm2-135m-instruct"  # BaseModelConfig's offline default, as in the CPU demo
PAPER_TARGETS = ["q_proj", "v_proj"]


def add_model_args(parser: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    """Add ``--model PATH`` and ``--dtype {auto,float32,bfloat16,float16}`` to a benchmark's parser."""
    from t2l_framework.llm.dtype import DTYPE_CHOICES

    parser.add_argument("--model", default=DEMO_MODEL, metavar="PATH",
                        help=f"base model: a local Hugging Face folder or GGUF file (default {DEMO_MODEL}, offline)")
    parser.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES,
                        help=f"base model dtype (default {dtype_default}: bfloat16 where the device does it natively, "
                             "else float32)")


def check_model(args: argparse.Namespace) -> None:
    """Exit with a clear message unless ``--model`` is the demo model or a path that exists."""
    if args.model != DEMO_MODEL and not Path(args.model).expanduser().exists():
        raise SystemExit(f"--model: '{args.model}' is neither {DEMO_MODEL} nor an existing local folder or file "
                         "(benchmarks never download models)")


def base_config(args: argparse.Namespace, base=None):
    """``BaseModelConfig`` for ``--model`` / ``--dtype``; ``base``: a recipe's section to start from."""
    from omegaconf import OmegaConf

    from t2l_framework.config import BaseModelConfig

    check_model(args)
    cfg = OmegaConf.structured(BaseModelConfig) if base is None else base
    return OmegaConf.merge(cfg, {"name_or_path": args.model, "dtype": args.dtype})


def load_model(args: argparse.Namespace, target_modules: Sequence[str] = PAPER_TARGETS, device=None, generator=None):
    """A ``T2LRuntime`` on ``--model`` in ``--dtype``, batched LoRA injected on ``target_modules``."""
    from t2l_framework.assembly import runtime_for

    return runtime_for(base_config(args), device, args.dtype, generator=generator, target_modules=target_modules)


def random_adapters(shapes, n: int, rank: int = 8, alpha: float = 16.0, seed: int = 0, device=None, dtype=None):
    """``n`` distinct random adapters: A[m]: [n, layers, r, in], B[m]: [n, layers, out, r] (B non-zero,
    so no LoRA path can be skipped as a no-op)."""
    import torch

    from t2l_framework.lora.weights import LoraWeights

    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(n, shapes.n_layers, rank, i, generator=g) * 0.02 for m, (i, o) in shapes.shapes.items()}
    B = {m: torch.randn(n, shapes.n_layers, o, rank, generator=g) * 0.02 for m, (i, o) in shapes.shapes.items()}
    weights = LoraWeights(A, B, rank, alpha)
    return weights.to(device=device, dtype=dtype)


def describe(runtime) -> str:
    cfg = runtime.model.config
    return (f"{runtime.base_model_name} ({runtime.dtype}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{sum(p.numel() for p in runtime.model.parameters()) / 1e6:.0f}M parameters) on {runtime.device}")
