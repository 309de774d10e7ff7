"""Training modes (``training.mode``) as objects: ``mode_for(cfg)`` and the registry (``base.py``).

Importing the package registers the built-in modes; a new mode is one module that subclasses
``TrainingMode`` and calls ``register``.
"""

from t2l_framework.training.modes.base import (HypernetworkFactory, Trainable, TrainingMode, mode_class, mode_for,
                                               register, registered_modes, unregister)
# registers the built-ins, in the order `t2l validate`'s errors list them
from t2l_framework.training.modes import sft, recon, lora, library  # noqa: F401, I001

__all__ = ["HypernetworkFactory", "Trainable", "TrainingMode", "mode_class", "mode_for", "register",
           "registered_modes", "unregister"]
