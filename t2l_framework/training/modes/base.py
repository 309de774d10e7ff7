"""``TrainingMode``: what one value of ``training.mode`` trains, on what data, with which loss,
and what it saves; and the registry that maps the recipe's name to it.

Everything that differs between modes is a question to the mode object (``mode_for(cfg)``),
never a test of the string, so adding a mode is one module that subclasses ``TrainingMode``
and calls ``register``. The built-in modes (``sft``, ``recon``, ``lora``, ``library``) are
registered when this package is imported.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping

from t2l_framework.errors import T2LError, did_you_mean

if TYPE_CHECKING:
    import lightning as L
    import torch
    from torch import nn

    from t2l_framework.llm.loading import LoadedModel
    from t2l_framework.lora.batched import LoraInjection
    from t2l_framework.lora.weights import LoraWeights, ModuleShapes
    from t2l_framework.run_folder import RunFolder
    from t2l_framework.training.module import T2LModule

# shapes -> a freshly built hypernetwork for them (the assembly layer knows the heads and the encoder width)
HypernetworkFactory = Callable[["ModuleShapes"], "nn.Module"]


class Trainable(Enum):
    """What a mode's optimizer updates."""

    HYPERNETWORK = "a hypernetwork: task-description embedding -> LoRA"
    ONE_LORA = "one LoRA shared by every sample"
    TASK_LORAS = "one LoRA per training task"


class TrainingMode(ABC):
    """One ``training.mode``. Built from the recipe (``mode_for``); subclasses read the settings
    they use once, in ``__init__``.

    Class attributes (questions other layers ask without building anything):
    name: the value of ``training.mode``; trains: what is optimised (``Trainable``);
    data_paths: recipe keys of data files that must exist when the recipe loads;
    produced_paths: recipe keys that must be set but are made by another run (checked when read);
    needs_base_model: whether training runs the frozen base LLM;
    reads_instances: whether batches are task instances (``T2LDataModule``: ``data.task_set``
    applies, a step holds ``n_tasks_per_batch x n_samples_per_task`` rows, the run's tasks are
    selected by that data module);
    end_of_training_table: whether ``eval.final_report`` scores the result on held-out SNI items.
    """

    name: ClassVar[str]
    trains: ClassVar[Trainable]
    data_paths: ClassVar[tuple[str, ...]] = ("data.tasks_file", "data.instances_file")
    produced_paths: ClassVar[tuple[str, ...]] = ()
    needs_base_model: ClassVar[bool] = True
    reads_instances: ClassVar[bool] = True
    end_of_training_table: ClassVar[bool] = False

    def __init__(self, cfg, recipe_file: Path | None = None):
        self.cfg, self.recipe_file = cfg, recipe_file  # relative paths resolve against the recipe's folder

    @property
    def embeds_descriptions(self) -> bool:
        """Whether the run embeds task descriptions (a hypernetwork reads them)."""
        return self.trains is Trainable.HYPERNETWORK

    # --- building what is trained -----------------------------------------------------
    @abstractmethod
    def datamodule(self, total_batches: int, base: LoadedModel | None) -> L.LightningDataModule:
        """The training data, set up; total_batches: micro-batches per rank (``data.stream``)."""

    @abstractmethod
    def trainable(self, datamodule: L.LightningDataModule, injection: LoraInjection | None,
                  hypernetwork: HypernetworkFactory) -> nn.Module:
        """The module the optimizer updates (``hypernetwork(shapes)`` builds a hypernetwork)."""

    def loss_targets(self, datamodule: L.LightningDataModule) -> tuple[dict, dict] | None:
        """(A, B) per module type that the loss regresses, when it regresses adapters."""
        return None

    # --- one training step --------------------------------------------------------------
    def adapters(self, module: T2LModule, batch: dict) -> LoraWeights:
        """The batch's adapters; by default generated from its descriptions."""
        return module.generate_weights(batch["desc_idx"])

    @abstractmethod
    def loss(self, module: T2LModule, batch: dict, weights: LoraWeights,
             train: bool) -> tuple[torch.Tensor, dict]:
        """(loss, logged values) of one batch; ``logs["loss"]`` is the loss."""

    # --- the result -----------------------------------------------------------------------
    @abstractmethod
    def save(self, run: RunFolder, pieces, trainer) -> Path:
        """Write the trained result (and any report of its own) into the run folder; rank 0 only.
        pieces: the ``RunPieces`` it trained with."""


_MODES: dict[str, type[TrainingMode]] = {}


def register(mode: type[TrainingMode]) -> type[TrainingMode]:
    """Make ``mode`` the class of ``training.mode: <mode.name>`` (usable as a class decorator)."""
    known = _MODES.get(mode.name)
    if known is not None and known is not mode:
        raise ValueError(f"training mode '{mode.name}' is already registered ({known.__module__}.{known.__qualname__})")
    _MODES[mode.name] = mode
    return mode


def unregister(name: str) -> None:
    """Forget a mode (tests that register a toy one)."""
    _MODES.pop(name, None)


def registered_modes() -> Mapping[str, type[TrainingMode]]:
    """name -> mode class, in registration order (the accepted values of ``training.mode``)."""
    return dict(_MODES)


def mode_class(name: str) -> type[TrainingMode]:
    """The class registered as ``name``; an unknown name is one ``T2LError`` line."""
    if name not in _MODES:
        raise T2LError(f"training.mode: '{name}' is not allowed{did_you_mean(name, _MODES)}; "
                       f"expected one of: {', '.join(_MODES)}")
    return _MODES[name]


def mode_for(cfg, recipe_file: Path | None = None) -> TrainingMode:
    """The recipe's ``training.mode``, built from the recipe (``recipe_file``: where it was read)."""
    return mode_class(str(cfg.training.mode))(cfg, recipe_file)
