"""``RunFolder``: the one place that knows how a run folder is laid out.

A run folder (``training.output_dir/run_name``, or what ``t2l import-reference`` writes)::

    recipe.yaml            the resolved recipe it was trained with
    hypernet/              hypernet_config.json + hypernet.safetensors (T2L runs)
    adapter/               adapter_config.json + adapter_model.safetensors (LoRA-baseline runs, PEFT)
    library/               one PEFT adapter folder per task + library.json (training.mode=library runs)
    checkpoints/           Lightning checkpoints (safetensors): last.ckpt, interrupted.ckpt, step*.ckpt
    logs/  tb/             CSV and TensorBoard metrics
    training_status.json   how far training got (steps, examples, wall time)
    report.md report.json  the end-of-training table, when the recipe asks for it
    eval/                  what ``t2l eval RUN`` writes by default
    reference/             an imported reference run: the released files it came from + import.json

Everything else asks this type for paths; nothing here loads or executes what a folder holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from t2l_framework.errors import T2LError

HYPERNET_CONFIG = "hypernet_config.json"
HYPERNET_WEIGHTS = "hypernet.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder ``root`` (which need not exist yet)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @classmethod
    def for_recipe(cls, cfg, recipe_file: Path | None) -> "RunFolder":
        """``training.output_dir / (training.run_name or the recipe file's stem)``."""
        name = cfg.training.run_name or (recipe_file.stem if recipe_file is not None else "run")
        return cls(Path(cfg.training.output_dir) / name)

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def hypernet(self) -> Path:
        return self.root / "hypernet"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def library(self) -> Path:
        """Task LoRAs of a ``training.mode=library`` run: the folder ``data.lora_library`` reads."""
        return self.root / "library"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def interrupted_checkpoint(self) -> Path:
        return self.checkpoints / "interrupted.ckpt"

    @property
    def logs(self) -> Path:
        """CSV metrics (``metrics.csv``; a resumed run appends)."""
        return self.root / "logs"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def status(self) -> Path:
        return self.root / "training_status.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def reference(self) -> Path:
        return self.root / "reference"

    @property
    def embedding_cache(self) -> Path:
        """Shared by all runs under one output folder: embeddings depend on encoder + text only."""
        return self.root.parent / ".embedding_cache"

    def has_recipe(self) -> bool:
        return self.recipe.is_file()

    def is_lora_run(self) -> bool:
        """A LoRA-baseline run: recipe.yaml + adapter/ (a PEFT folder)."""
        return self.has_recipe() and (self.adapter / PEFT_CONFIG).is_file()

    def has_hypernet(self) -> bool:
        return (self.hypernet / HYPERNET_CONFIG).is_file()


def locate_hypernet(folder: str | Path) -> tuple[Path, Path | None]:
    """(hypernet folder, recipe.yaml or None) for a run folder or a bare hypernet folder.

    A bare hypernet folder inside a run (``RUN/hypernet``) still finds ``RUN/recipe.yaml``.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise T2LError(f"{folder}: no such folder; expected a run folder (runs/NAME) or its hypernet/ folder")
    if (folder / HYPERNET_CONFIG).is_file():
        run = RunFolder(folder.parent)
        return folder, run.recipe if run.has_recipe() else None
    run = RunFolder(folder)
    if run.has_hypernet():
        return run.hypernet, run.recipe if run.has_recipe() else None
    if (run.adapter / PEFT_CONFIG).is_file():
        raise T2LError(f"{folder}: a LoRA-baseline run (its adapter/ is already a PEFT folder); "
                       "generating adapters needs a T2L run with a hypernet/ folder")
    raise T2LError(f"{folder}: not a T2L run folder (no recipe.yaml + hypernet/) nor a hypernet folder "
                   f"(no {HYPERNET_CONFIG}); train one with `t2l fit RECIPE`")


def display_name(folder: Path) -> str:
    """The name results are reported under: the run's name for ``RUN/adapter`` or ``RUN/hypernet``."""
    folder = Path(folder)
    return (folder.parent if folder.name in ("adapter", "hypernet") else folder).resolve().name
