"""LoRA weights, target discovery, batched per-sample injection, and PEFT adapter import/export."""

from t2l_framework.lora.batched import BatchedLoraLinear, LoraInjection, inject_lora
from t2l_framework.lora.peft_io import export_peft_adapter, import_peft_adapter, module_paths
from t2l_framework.lora.targets import decoder_layers, find_targets, target_shapes
from t2l_framework.lora.weights import LoraWeights, ModuleShapes

__all__ = ["LoraWeights", "ModuleShapes", "BatchedLoraLinear", "LoraInjection", "inject_lora",
           "export_peft_adapter", "import_peft_adapter", "module_paths", "decoder_layers", "find_targets",
           "target_shapes"]
