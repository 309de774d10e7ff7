"""SNI-style tasks, their descriptions, tokenisation and the LightningDataModule."""

from t2l_framework.data.datamodule import EvalItem, T2LDataModule, TrainBatches
from t2l_framework.data.stream import StreamSampler
from t2l_framework.data.encoding import IGNORE_INDEX, encode_example, encode_examples, encode_prompt, pad_batch
from t2l_framework.data.tasks import (
    T2L_DECONTAM_EXCLUDED,
    Instance,
    Task,
    expand_task_ids,
    load_tasks,
    split_descriptions,
)

__all__ = [
    "EvalItem", "IGNORE_INDEX", "Instance", "StreamSampler", "T2LDataModule", "T2L_DECONTAM_EXCLUDED", "Task",
    "TrainBatches", "encode_example", "encode_examples", "encode_prompt", "expand_task_ids", "load_tasks", "pad_batch",
    "split_descriptions",
]
