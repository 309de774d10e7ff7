"""Recipe schema (OmegaConf structured dataclasses), loading, overrides and validation.

A recipe is YAML merged onto these defaults, then command-line overrides in dotlist form
(``hypernet.head=chunked trainer.max_steps=10``). Every problem becomes one ``T2LError``
that names the key path and what was expected.

A run folder's ``recipe.yaml`` is untrusted input (``load_recipe(..., untrusted=True)``): its
errors name the file, the key and the expected type but never a value found there (the file
may be a link to one that holds secrets), and interpolations (``${oc.env:...}``) are refused.
Every recipe is bounded: YAML aliases may not expand it past ``MAX_RECIPE_NODES`` nodes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from t2l_framework.errors import T2LError, did_you_mean


def _help(text: str, default: Any = None, factory: Any = None, *, choices: tuple | None = None,
          range: tuple | None = None) -> Any:
    """A schema field with its help text and, where it has them, its allowed values (``choices``)
    or bounds (``range``: ``(low, high[, low inclusive])``, None = unbounded on that side; see
    ``range_problem``). ``CHOICES`` and ``RANGES`` are read from these; ``validate`` checks them."""
    metadata: dict[str, Any] = {"help": text}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if range is not None:
        metadata["range"] = (*range, True) if len(range) == 2 else tuple(range)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Bounds shared by many fields. Upper bounds are sanity limits that keep a typo (latent_size:
# 10000000) from allocating gigabytes. A float high is exclusive (dropout 1.0 zeroes everything).
_WIDTH = (1, 65536)
_PROBABILITY = (0.0, 1.0)
_POSITIVE = (1, None)  # counts that must be at least 1
_COUNT = (0, None)  # counts where 0 is allowed (its meaning is in the help text)
_NON_NEGATIVE = (0.0, None)
_ABOVE_ZERO = (0.0, None, False)

# Named task sets a recipe can require (data.task_set): name -> task list file; data/task_sets.py reads them.
TASK_SETS = {"paper479": "data/sni/paper_train_tasks.txt"}
# trainer.strategy values beyond Lightning's own names (training/strategies.py builds them).
DEEPSPEED_STRATEGIES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
                        "deepspeed_stage_3", "deepspeed_stage_3_offload")
SHARDED_BASE_STRATEGY = "fsdp_base"


class _Section:
    """A recipe section built in Python (``HypernetConfig(dropout=1.5)``) is checked like a recipe file."""

    def __post_init__(self) -> None:
        section = _SECTION_NAMES[type(self)]
        for f in fields(self):
            problem = value_problem(f"{section}.{f.name}", getattr(self, f.name))
            if problem:
                raise T2LError(f"{type(self).__name__}: {section}.{f.name}: {problem}")


@dataclass
class BaseModelConfig(_Section):
    """The frozen LLM the generated LoRAs adapt."""

    name_or_path: str = _help("Hub id, local folder, GGUF file, or 'smollm2-135m-instruct' (offline)", "smollm2-135m-instruct")
    gguf_file: Optional[str] = _help("GGUF file name inside name_or_path (transformers' gguf_file=)", None)
    family: str = _help("Model family plugin name, or 'auto' to pick it from the model config", "auto")
    dtype: str = _help("Weights dtype: auto (bfloat16 on GPUs and CPUs with native bf16, else float32) | "
                       "float32 | bfloat16 | float16", "auto", choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = _help("Allow custom modelling code from the hub", False)
    chat_template: bool = _help("Format prompts with the model's chat template", True)


@dataclass
class EncoderConfig(_Section):
    """The text encoder that embeds task descriptions."""

    name: str = _help("Encoder plugin name (transformers | sentence_transformers | ...)", "sentence_transformers")
    model: str = _help("Hub id or local folder; 'all-MiniLM-L6-v2' uses the offline pip package", "all-MiniLM-L6-v2")
    pooling: str = _help("mean | cls (transformers encoder)", "mean", choices=("mean", "cls"))
    prefix: str = _help("Instruction prefix prepended to every description", "")
    normalize: bool = _help("L2-normalise embeddings", True)
    normalize_scale: str = _help("Norm after L2 normalisation: sqrt_dim (the reference: sqrt(d), 32 for a 1024-d "
                                 "encoder) | unit (1)", "sqrt_dim", choices=("sqrt_dim", "unit"))
    full_stop: bool = _help("Strip each description and end it with '.' when it ends in a letter (the reference's "
                            "add_full_stop)", True)
    max_length: int = _help("Tokens per description", 512, range=_POSITIVE)
    batch_size: int = _help("Descriptions per encoder forward", 64, range=_POSITIVE)
    trust_remote_code: bool = _help("Allow custom modelling code (gte-large-en-v1.5 needs it)", False)


@dataclass
class HypernetConfig(_Section):
    """The hypernetwork: trunk MLP and output head."""

    head: str = _help("per_layer (L) | shared (M) | chunked (S) | plugin name | 'pkg.module:Class'", "per_layer")
    task_dim: int = _help("Width of the projected task embedding (reference: hypernet_latent_size // 2)", 64,
                          range=_WIDTH)
    layer_emb_dim: int = _help("Width of the learned layer-depth embedding (reference: hypernet_latent_size // 4)",
                               32, range=_WIDTH)
    module_emb_dim: int = _help("Width of the learned module-type embedding (reference: hypernet_latent_size // 4); "
                                "trunk width = task_dim + layer_emb_dim + module_emb_dim", 32, range=_WIDTH)
    latent_size: int = _help("Width of the trunk output = head input (reference: head_in_size)", 512, range=_WIDTH)
    n_residual_blocks: int = _help("Residual MLP blocks in the trunk; the heads condition the last one "
                                   "(reference: 2, mlp1 and mlp2)", 2, range=(1, 256))
    dropout: float = _help("Dropout inside the trunk (reference: 0.05)", 0.05, range=_PROBABILITY)
    chunk_position: str = _help("chunked (S) head: how the rank index enters the trunk: rotary (paper's S, "
                                "no parameters) | learned (Embedding + LayerNorm)", "rotary",
                                choices=("rotary", "learned"))
    output_offset: bool = _help("The generated A and B are added to a fixed per-layer LoRA held with the weights "
                                "(set by training.mtlora_offset or recon_loss=factors_z; recorded so a checkpoint "
                                "rebuilds it)", False)
    output_scale: bool = _help("The generated A and B are z-scores, multiplied entry by entry by a fixed per-layer "
                               "std before the offset is added (set by training.recon_loss=factors_z; recorded so a "
                               "checkpoint rebuilds it)", False)


@dataclass
class LoraConfig(_Section):
    """The LoRA adapters the hypernetwork generates (PEFT's convention)."""

    rank: int = _help("LoRA rank r", 8, range=(1, 4096))
    alpha: float = _help("LoRA alpha; scaling = alpha / sqrt(r) with use_rslora (the paper), else alpha / r", 16.0,
                         range=_ABOVE_ZERO)
    use_rslora: bool = _help("rsLoRA scaling alpha / sqrt(r), as the T2L reference trains and saves", True)
    dropout: float = _help("Dropout on the LoRA input (the reference: 0.05)", 0.05, range=_PROBABILITY)
    target_modules: list[str] = _help("Linear layers that get a LoRA", factory=lambda: ["q_proj", "v_proj"])


@dataclass
class DataConfig(_Section):
    """Where tasks, descriptions and instances come from."""

    tasks_file: str = _help("JSONL of task records (task, descriptions, eval_descriptions, ...)", "data/sni/tasks.jsonl.gz")
    instances_file: str = _help("JSONL of instances (task, split, input, output)", "data/sni/instances.jsonl.gz")
    train_tasks: list[str] = _help("Task ids to train on; empty = every task whose role includes 'train'", factory=list)
    eval_tasks: list[str] = _help("Never-trained task ids to evaluate on", factory=list)
    exclude_tasks: list[str] = _help("Task ids never used (decontamination)", factory=list)
    n_tasks_per_batch: int = _help("Distinct tasks per training step", 8, range=_POSITIVE)
    n_samples_per_task: int = _help("Instances per task per step", 1, range=_POSITIVE)
    holdout_descriptions: int = _help("Descriptions per training task held back for validation", 3, range=_COUNT)
    max_prompt_tokens: int = _help("Prompt tokens kept (truncated from the left)", 200, range=_POSITIVE)
    max_answer_tokens: int = _help("Answer tokens kept", 32, range=_POSITIVE)
    max_total_tokens: int = _help("Prompt + answer tokens kept (0 = no joint limit). Like the reference's inp_max_len "
                                  "(tokenizer truncation 'longest_first'): tokens come off the longer of the two until "
                                  "the pair fits; the prompt loses its start, the answer its end", 0, range=_COUNT)
    max_descriptions_per_task: int = _help("Use only the first N descriptions of each task (0 = all; the reference: "
                                           "n_descs_per_ds=128)", 0, range=_COUNT)
    task_set: str = _help("Tasks the recipe requires: '' (none) | paper479 (the paper's 479 SNI training tasks, "
                          "data/sni/paper_train_tasks.txt; the default train_tasks). `t2l fit` stops when any is "
                          "missing; `t2l data fetch` downloads them", "", choices=("", *TASK_SETS))
    fetched_dir: str = _help("Folder `t2l data fetch` wrote (tasks.jsonl + instances.jsonl), e.g. data/sni_hub; "
                             "when it holds them, its tasks join those of tasks_file (a task in both is read from "
                             "tasks_file). Empty = none", "")
    max_train_instances: int = _help("Training instances used per task (0 = all)", 0, range=_COUNT)
    max_eval_instances: int = _help("Held-out instances per task for evaluation (0 = all)", 16, range=_COUNT)
    system_prompt: str = _help("System message added to every chat prompt", "")
    num_workers: int = _help("DataLoader workers", 0, range=_COUNT)
    lora_library: str = _help("Folder of PEFT adapters, one sub-folder per task (recon mode)", "")
    length_grouping: bool = _help("Regroup the rows of every length_grouping_window consecutive training batches by "
                                  "token length, so each step pads little: the run sees the same examples (the same "
                                  "multiset over each full window), deterministic by seed and exact on resume; a step "
                                  "may then hold one task more than once", False)
    length_grouping_window: int = _help("Batches regrouped together by length_grouping (windows start at batch 0; "
                                        "make max_steps x accumulate_grad_batches a multiple of it)", 16,
                                        range=_POSITIVE)
    tokens_per_step: int = _help("Throughput mode (0 = off, the paper's fixed batch of n_tasks_per_batch x "
                                 "n_samples_per_task rows): the rows of length_grouping_window such draws are "
                                 "sorted by length and packed into steps of at most this many padded tokens "
                                 "(rows x longest row), so a step holds many samples and little padding. "
                                 "A step then sees more examples than the paper's batch", 0, range=_COUNT)


@dataclass
class TrainingConfig(_Section):
    """What is optimised and how (the math; hardware lives in `trainer`)."""

    # Its accepted values are the registered modes (training/modes), checked by assembly.load_recipe.
    mode: str = _help("sft | recon | lora | library (one LoRA per training task, all in one run)", "sft")
    lr: float = _help("Peak learning rate", 2.5e-5, range=(0.0, 10.0, False))
    weight_decay: float = _help("AdamW weight decay", 0.01, range=_NON_NEGATIVE)
    mtlora_offset: str = _help("sft mode: a PEFT LoRA folder (e.g. a multi-task LoRA run's adapter/) the "
                               "hypernetwork's output starts from: a fixed offset added to every generated "
                               "adapter (the reference's mt-LoRA init); empty = none", "")
    lr_head_bias: float = _help("Learning rate of the hypernetwork head's biases (the part every generated adapter "
                                "shares) as a multiple of lr; the trunk and head weights (the task-specific part) "
                                "keep lr", 1.0, range=_NON_NEGATIVE)
    warmup_steps: int = _help("Linear warm-up steps (lr rises from 0, as in transformers' schedules)", 100,
                              range=_COUNT)
    warmup_ratio: float = _help("Warm-up as a fraction of trainer.max_steps; > 0 replaces warmup_steps "
                                "(the reference: warmup_frac=0.2)", 0.0, range=_PROBABILITY)
    scheduler: str = _help("cosine | linear | constant", "cosine", choices=("cosine", "linear", "constant"))
    label_smoothing: float = _help("Cross-entropy label smoothing", 0.1, range=_PROBABILITY)
    loss_reduction: str = _help("per_sample: mean over each sample's answer tokens, then over samples (the reference) "
                                "| per_token: mean over all answer tokens of the batch (long answers weigh more)",
                                "per_sample", choices=("per_sample", "per_token"))
    l2_penalty: float = _help("L2 penalty on generated LoRA weights", 1e-3, range=_NON_NEGATIVE)
    l2_reduction: str = _help("sum: sum over module types of mean(A^2) + mean(B^2), each mean over samples and "
                              "layers (the reference) | mean: the mean of those 2 x modules terms", "sum",
                              choices=("sum", "mean"))
    recon_loss: str = _help("recon mode: delta_w (the reference's L1 on B @ A x delta_w_scaling) | factors "
                            "(L1 on A and on B, halved; the reference's factorized=True, pred_z_score=False) | "
                            "factors_z (the same L1 on z-scores: the network emits each entry standardised by the "
                            "library's mean and std over tasks; the reference's factorized=True, pred_z_score=True)",
                            "delta_w", choices=("delta_w", "factors", "factors_z"))
    delta_w_scaling: float = _help("recon_loss=delta_w: factor on both sides of the L1 (the reference: 1e4)", 1e4,
                                   range=_ABOVE_ZERO)
    neftune_alpha: float = _help("NEFTune noise on input embeddings (0 = off)", 5.0, range=_NON_NEGATIVE)
    compile: bool = _help("torch.compile the base model's decoder stack for training steps (the per-sample LoRA "
                          "factors are graph inputs; NEFTune noise is added outside the graph); not with "
                          "trainer.strategy=fsdp_base", False)
    compile_backend: str = _help("torch.compile backend when training.compile is on (inductor; 'eager' traces "
                                 "without code generation, for checking a model compiles)", "inductor")
    seed: int = _help("Random seed", 42)
    output_dir: str = _help("Runs are written to output_dir/run_name", "runs")
    run_name: str = _help("Run folder name; empty = recipe name + timestamp", "")
    checkpoint_every_n_steps: int = _help("Checkpoint interval (optimizer steps)", 100, range=_POSITIVE)
    lora_tasks: list[str] = _help("lora mode: tasks to train one LoRA on (empty = all training tasks)", factory=list)
    library_init: str = _help("library mode: shared: every task's LoRA starts from one init (as LoRAs trained "
                              "apart with one seed do), so their differences are what training taught | per_task: "
                              "an independent random A per task", "shared", choices=("shared", "per_task"))
    allow_cut_short: bool = _help("Accept a run that trainer.max_time stopped before trainer.max_steps "
                                  "(t2l fit then exits 0; the reports still mark it cut short)", False)


@dataclass
class TrainerConfig(_Section):
    """Passed to ``lightning.Trainer``."""

    accelerator: str = _help("cpu | gpu | auto", "auto")
    devices: Any = _help("Device count or list, or 'auto'", "auto")
    num_nodes: int = _help("Nodes", 1, range=_POSITIVE)
    precision: str = _help("Lightning's precision", "32-true",
                           choices=("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true"))
    strategy: str = _help("Lightning's strategy names, DeepSpeed ZeRO stages, or fsdp_base (the frozen base sharded "
                          "across ranks with FSDP2, the hypernetwork under DDP; docs/scaling.md)", "auto",
                          choices=("auto", "ddp", *DEEPSPEED_STRATEGIES, SHARDED_BASE_STRATEGY))
    max_steps: int = _help("Optimizer steps", 1000, range=_POSITIVE)
    max_time: Optional[str] = _help("Wall-clock safety net 'DD:HH:MM:SS': a run it stops before max_steps is "
                                    "reported as cut short and t2l fit exits 3", None)
    accumulate_grad_batches: int = _help("Gradient accumulation", 1, range=_POSITIVE)
    gradient_clip_val: Optional[float] = _help("Gradient norm clip", 1.0, range=_NON_NEGATIVE)
    val_check_interval: Optional[int] = _help("Validate every N training batches (None = each epoch)", 200,
                                              range=_POSITIVE)
    limit_val_batches: Optional[float] = _help("Validation batches per check", 8, range=_NON_NEGATIVE)
    log_every_n_steps: int = _help("Logging interval", 10, range=_POSITIVE)
    enable_progress_bar: bool = _help("Show a progress bar", True)


@dataclass
class EvalConfig(_Section):
    """Evaluation settings (`t2l eval`, end-of-training tables)."""

    benchmarks: list[str] = _help("`t2l eval` benchmarks: names, 'paper' (the ten of the T2L paper) or 'all'; "
                                  "empty = paper", factory=list)
    limit: int = _help("Examples per benchmark (0 = all)", 0, range=_COUNT)
    batch_size: int = _help("Examples per forward", 8, range=_POSITIVE)
    max_new_tokens: int = _help("Most tokens of a generated answer: the end-of-training tables' length, and "
                                "`t2l eval`'s cap on each benchmark's own (unless --max-new-tokens is given)", 32,
                                range=_POSITIVE)
    n_descriptions: int = _help("Descriptions averaged per benchmark", 3, range=_POSITIVE)
    val_generation_batches: int = _help("Validation batches also scored by ROUGE-L of greedy answers", 1, range=_COUNT)
    final_report: bool = _help("After `t2l fit`, print the held-out SNI table (base / +description / T2L / control)", False)
    report_max_items: int = _help("Items per split in that table (0 = all)", 0, range=_COUNT)
    answer_loglik: bool = _help("Also score reference-answer benchmarks (SNI) by the log-likelihood of each item's "
                                "reference answer (nats per token, the quantity training maximises): finer than "
                                "exact match; one teacher-forced pass per condition", True)
    report_seen_per_task: int = _help("Held-out items per training task in that table (0 = data.max_eval_instances); "
                                      "the never-seen tasks keep data.max_eval_instances each", 0)
    baseline_adapter: str = _help("PEFT adapter folder (e.g. a multi-task LoRA run's adapter/) added to the table", "")
    arrow_library: str = _help("Folder of PEFT task adapters (data.lora_library's layout) routed by Arrow: a condition "
                               "of the end-of-training table and of `t2l eval` (--adapters arrow); empty = none", "")
    protocol: str = _help("`t2l eval` protocol: paper (the T2L reference's prompts and matching rules), lm-eval "
                          "(lm-evaluation-harness's cloze formats, acc and acc_norm) or chat; see docs/evaluation.md",
                          "paper", choices=("paper", "lm-eval", "chat"))


@dataclass
class Recipe:
    """A complete T2L recipe."""

    description: str = _help("One line shown by `t2l recipes`", "")
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _leaf_fields(schema: type | None = None, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, dataclass field) of every value of the schema, section by section."""
    found = []
    for f in fields(schema or Recipe):
        nested = f.default_factory if isinstance(f.default_factory, type) and is_dataclass(f.default_factory) else None
        found += _leaf_fields(nested, f"{prefix}{f.name}.") if nested else [(f"{prefix}{f.name}", f)]
    return found


# Allowed values and bounds per key, read from the fields' metadata (``_help``).
CHOICES: dict[str, tuple] = {k: f.metadata["choices"] for k, f in _leaf_fields() if "choices" in f.metadata}
RANGES: dict[str, tuple] = {k: f.metadata["range"] for k, f in _leaf_fields() if "range" in f.metadata}
_SECTION_NAMES: dict[type, str] = {f.default_factory: f.name for f in fields(Recipe)
                                   if isinstance(f.default_factory, type) and is_dataclass(f.default_factory)}
# Keys that were removed: key -> (the value it always had in effect, why). A recipe giving that
# value (every run folder written before the removal holds it) loads as before; another value is
# refused with the reason, since the recipe's author expected it to do something.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "encoder.trainable": (False, "it never did anything (the encoder is always frozen, as in the paper, and "
                                 "descriptions are embedded once before training); delete the line"),
}


def _without_removed_keys(data: dict) -> dict:
    """``data`` less the removed keys that hold the value they always had in effect."""
    for key, (inert, _) in REMOVED_KEYS.items():
        section, _, leaf = key.rpartition(".")
        node = data.get(section)
        if isinstance(node, dict) and leaf in node and node[leaf] == inert and type(node[leaf]) is type(inert):
            data = {**data, section: {k: v for k, v in node.items() if k != leaf}}
    return data


# Data paths are checked only when the recipe's mode needs them.
# (recipe, where it came from, import_code) -> None or T2LError; see ``load_recipe``. For an
# untrusted recipe it is also given untrusted=True: its errors must not quote the names it found.
NameCheck = Callable[..., None]


class ModePaths(Protocol):
    """What ``validate`` asks a ``training.mode`` (``t2l_framework.training.modes``, a higher layer,
    passes them in): data_paths must be set and exist; produced_paths (made by another run) must
    be set, and are checked when read."""

    data_paths: tuple[str, ...]
    produced_paths: tuple[str, ...]


def project_root() -> Path:
    """Folder holding ``recipes/`` and ``data/`` (the repo root for an editable install)."""
    env = os.environ.get("T2L_HOME")
    return Path(env) if env else Path(__file__).resolve().parent.parent


def recipes_dir() -> Path:
    return project_root() / "recipes"


def comma_list(values: "str | list[str] | tuple[str, ...] | None") -> list[str]:
    """Names given as one string or a list, each possibly comma-separated (``--adapters a,b --adapters c``)."""
    if values is None:
        return []
    values = [values] if isinstance(values, str) else list(values)
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def resolve_path(path: str, recipe_file: Optional[Path] = None) -> Path:
    """Relative paths are tried against the cwd, the recipe's folder's parent, then the project root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    candidates = [Path.cwd() / p]
    if recipe_file is not None:
        candidates += [recipe_file.resolve().parent / p, recipe_file.resolve().parent.parent / p]
    candidates.append(project_root() / p)
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (with or without .yaml)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = {f.stem: f for f in recipes_dir().glob("*.yaml")}
    stem = p.stem if p.suffix in (".yaml", ".yml") else p.name
    if p.parent == Path(".") and stem in shipped:
        return shipped[stem]
    raise T2LError(
        f"recipe '{name_or_path}' not found: no such file and no shipped recipe of that name"
        f"{did_you_mean(stem, shipped)}. `t2l recipes` lists the shipped ones."
    )


class _DuplicateKey(yaml.MarkedYAMLError):
    """A mapping names the same key twice (PyYAML would silently keep the last value)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # unhashable key: SafeLoader reports it below
                continue
            if first is not key_node.start_mark:
                raise _DuplicateKey(None, None, f"duplicate key '{key}' (first given on line {first.line + 1})",
                                    key_node.start_mark)
        return super().construct_mapping(node, deep)


# Nodes of a recipe once its YAML aliases are expanded. Shipped recipes have ~100; nine levels of
# nine aliases of each other are 9**9 nodes in 1.5 kB, which OmegaConf would spend minutes building.
MAX_RECIPE_NODES = 10_000


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes under ``node`` with every alias expanded, counted once per distinct node (memo)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a node that contains itself (a recursive alias) is counted once here
        if isinstance(node, yaml.SequenceNode):
            memo[id(node)] += sum(_expanded_nodes(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[id(node)] += sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    return memo[id(node)]


def _load_bounded(text: str, path: Path) -> Any:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}) > MAX_RECIPE_NODES:
            raise T2LError(f"{path}: YAML aliases expand this recipe past {MAX_RECIPE_NODES} values; "
                           "a recipe is a small mapping of sections")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict:
    """Parse a YAML file; a syntax error or a duplicate key names the file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise T2LError(f"cannot read recipe {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise T2LError(f"{path}: a recipe must be UTF-8 text") from None
    try:
        data = _load_bounded(text, path)
    except _DuplicateKey as exc:
        mark = exc.problem_mark
        raise T2LError(f"{path}:{mark.line + 1}:{mark.column + 1}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise T2LError(f"{where}: malformed YAML: {exc.problem or exc.context}") from None
    except RecursionError:
        raise T2LError(f"{path}: malformed YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise T2LError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _valid_keys(cfg: DictConfig, parent: str) -> list[str]:
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _explain(exc: OmegaConfBaseException, cfg: DictConfig, origin: str, untrusted: bool = False) -> T2LError:
    """One line for an OmegaConf error; ``untrusted``: without the value OmegaConf quotes."""
    key = getattr(exc, "full_key", None) or ""
    parent, _, leaf = key.rpartition(".")
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc) and "not in" in str(exc):
        if key in REMOVED_KEYS:
            return T2LError(f"{origin}: '{key}' was removed: {REMOVED_KEYS[key][1]}")
        valid = _valid_keys(cfg, parent)
        section = f"section '{parent}'" if parent else "the recipe's top level"
        return T2LError(
            f"{origin}: unknown key '{key}'{did_you_mean(leaf, valid)}; {section} accepts: {', '.join(valid)}"
        )
    if isinstance(exc, ValidationError):
        expected = _expected_type(cfg, key)
        detail = (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]
        return T2LError(f"{origin}: wrong type for '{key}': expected {expected}" + ("" if untrusted else f" ({detail})"))
    detail = (str(exc) or type(exc).__name__).splitlines()[0]
    return T2LError(f"{origin}: invalid value for '{key}'" + ("" if untrusted else f": {detail}"))


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "ListConfig": "a list", "DictConfig": "a mapping", "NoneType": "a value",
               "IntegerNode": "an integer", "FloatNode": "a number", "BooleanNode": "true or false",
               "StringNode": "a string", "AnyNode": "a value"}


def _expected_type(cfg: DictConfig, key: str) -> str:
    """What the schema holds at ``key``, read from its node (resolving it could fail again)."""
    parent, _, leaf = key.rpartition(".")
    section = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    node = section._get_node(leaf) if isinstance(section, DictConfig) and leaf in section else None
    name = type(node).__name__ if node is not None else "NoneType"
    return _TYPE_WORDS.get(name, name)


def _section_problem(cfg: DictConfig, data: Any, prefix: str = "") -> str | None:
    """The first key where ``data`` gives a plain value for a schema section (OmegaConf's own error
    for that names no key)."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        node = cfg._get_node(key) if isinstance(key, str) and key in cfg else None
        if isinstance(node, DictConfig):
            if value is not None and not isinstance(value, dict):
                return f"{prefix}{key}"
            found = _section_problem(node, value, f"{prefix}{key}.")
            if found:
                return found
    return None


def _empty_strings(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """``key=`` on a string field means the empty string (OmegaConf's dotlist reads it as null, which a
    ``str`` field refuses), so ``eval.baseline_adapter=`` turns a recipe's path off as a user expects."""
    out = []
    for item in overrides:
        key, value = item.split("=", 1)
        current = OmegaConf.select(cfg, key.strip(), default=None, throw_on_missing=False)
        out.append(f"{key}=''" if value == "" and isinstance(current, str) else item)
    return out


def _merge(cfg: DictConfig, other: Any, origin: str, untrusted: bool = False) -> DictConfig:
    section = _section_problem(cfg, other)
    if section:
        raise T2LError(f"{origin}: wrong type for '{section}': expected a mapping (a section of keys)")
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as exc:
        raise _explain(exc, cfg, origin, untrusted) from None


def _interpolations(data: Any, prefix: str = "") -> list[str]:
    """Key paths of the strings in plain YAML data that OmegaConf would resolve (``${...}``)."""
    if isinstance(data, dict):
        return [k for key, value in data.items() for k in _interpolations(value, f"{prefix}{key}.")]
    if isinstance(data, list):
        return [k for i, value in enumerate(data) for k in _interpolations(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(data, str) and "${" in data else []


def _resolve(cfg: DictConfig, origin: str, untrusted: bool) -> None:
    """Resolve interpolations now, so a bad one is one clear error here and not a traceback later."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, cfg, origin, untrusted) from None


def _string_lists(schema: type = Recipe, prefix: str = "") -> list[str]:
    """Key paths of the schema's ``list[str]`` fields."""
    keys = []
    for name, f in schema.__dataclass_fields__.items():
        nested = f.default_factory if isinstance(f.default_factory, type) else None
        if nested is not None and hasattr(nested, "__dataclass_fields__"):
            keys += _string_lists(nested, f"{prefix}{name}.")
        elif str(f.type) in ("list[str]", "typing.List[str]"):
            keys.append(f"{prefix}{name}")
    return keys


def load_recipe(path_or_name: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = True, check_names: NameCheck | None = None,
                import_code: bool = False, untrusted: bool = False,
                modes: Mapping[str, ModePaths] | None = None) -> DictConfig:
    """Defaults <- recipe file <- overrides, then every value checked. Returns a read-only config
    with every interpolation resolved.

    modes: the accepted values of ``training.mode`` (``training.modes.registered_modes()``, which
    ``t2l_framework.assembly.load_recipe`` passes); None leaves the mode and its data paths to
    whoever builds the mode.

    check_names: checks the plugin names the recipe uses (heads, encoders, families,
    benchmarks); ``t2l_framework.assembly.load_recipe`` passes the registry's. import_code: also
    import a head named by import path (runs that module's code); by default it is only looked
    up, so loading a recipe never executes code from it. untrusted: a run folder's recipe (see
    the module docstring): no values in errors, no interpolations.
    """
    cfg = OmegaConf.structured(Recipe)
    recipe_file = None
    if path_or_name is not None:
        recipe_file = find_recipe(str(path_or_name))
        data = _without_removed_keys(read_yaml(recipe_file))
        if untrusted:
            found = _interpolations(data)
            if found:
                raise T2LError(f"{recipe_file}: {found[0]}: interpolations (${{...}}) are not allowed in a run "
                               "folder's recipe, since resolving them can read the environment and files; pass "
                               "--trust-remote-code only if you trust where this run came from")
        cfg = _merge(cfg, data, str(recipe_file), untrusted)
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise T2LError(f"override '{item}' is not of the form key=value (for example trainer.max_steps=10)")
        try:
            dot = OmegaConf.from_dotlist(_empty_strings(cfg, overrides))
        except OmegaConfBaseException as exc:
            raise T2LError(f"command-line overrides: {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, dot, "command-line override")
    _resolve(cfg, str(recipe_file) if recipe_file else "recipe", untrusted)
    validate(cfg, recipe_file, check_files=check_files, check_names=check_names, import_code=import_code,
             untrusted=untrusted, modes=modes)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def range_problem(value: Any, low: Any, high: Any, low_inclusive: bool = True) -> str | None:
    """What is wrong with ``value`` for a ``RANGES`` entry (None = fine, or not a number: the schema's
    types are OmegaConf's job). A float ``high`` is exclusive (dropout 1.0), an int one inclusive."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    integral = isinstance(low, int)
    high_open = isinstance(high, float)
    if integral and low == 1:
        expected = "a positive integer" + (f" up to {high}" if high is not None else "")
    elif high is None:
        expected = f"{'an integer' if integral else 'a number'} {'>=' if low_inclusive else '>'} {low}"
    else:
        expected = (f"{'an integer' if integral else 'a number'} in {'[' if low_inclusive else '('}{low}, "
                    f"{high}{')' if high_open else ']'}")
    bad = (isinstance(value, float) and not math.isfinite(value)) or value < low or (value == low and not low_inclusive)
    bad = bad or (high is not None and (value > high or (high_open and value >= high)))
    return f"expected {expected}, got {value!r}" if bad else None


def value_problem(key: str, value: Any, untrusted: bool = False, choices: tuple | None = None) -> str | None:
    """What is wrong with ``value`` for ``key`` by its field's choices or range (None = fine);
    ``untrusted``: said without the value; ``choices``: allowed values known only above this
    layer (``training.mode``: the registered modes)."""
    choices = choices if choices is not None else CHOICES.get(key)
    if choices is not None and str(value) not in choices:
        found = ("this value is not allowed" if untrusted
                 else f"'{value}' is not allowed{did_you_mean(str(value), choices)}")
        return f"{found}; expected one of: {', '.join(choices)}"
    problem = range_problem(value, *RANGES[key]) if key in RANGES else None
    return problem.split(", got ")[0] if problem and untrusted else problem


def validate(cfg: DictConfig, recipe_file: Optional[Path] = None, check_files: bool = True,
             check_names: NameCheck | None = None, import_code: bool = False, untrusted: bool = False,
             modes: Mapping[str, ModePaths] | None = None) -> None:
    """Value checks the schema's types cannot express: choices, ranges, lists of names, plugin
    names, files. untrusted: the messages name key and file, never the value. modes: see
    ``load_recipe``."""
    origin = str(recipe_file) if recipe_file else "recipe"
    extra = {} if modes is None else {"training.mode": tuple(modes)}  # the registered modes
    for key in (*CHOICES, *RANGES, *extra):
        problem = value_problem(key, OmegaConf.select(cfg, key, default=None), untrusted, extra.get(key))
        if problem:
            raise T2LError(f"{origin}: {key}: {problem}")
    for key in _string_lists():
        if any(not isinstance(item, (str, int, float)) for item in OmegaConf.to_container(OmegaConf.select(cfg, key))):
            raise T2LError(f"{origin}: {key}: expected a list of names (strings), not of lists or mappings")
    if not cfg.lora.target_modules:
        raise T2LError(f"{origin}: lora.target_modules: expected at least one module name")
    if check_names is not None:
        if untrusted:
            check_names(cfg, origin, import_code, untrusted=True)
        else:
            check_names(cfg, origin, import_code)
    if check_files and modes is not None:
        mode = modes[str(cfg.training.mode)]
        for key in (*mode.data_paths, *mode.produced_paths):
            value = OmegaConf.select(cfg, key)
            if not value:
                raise T2LError(f"{origin}: {key}: training.mode={cfg.training.mode} needs a path here")
            if key in mode.data_paths and not resolve_path(value, recipe_file).exists():
                raise T2LError(f"{origin}: {key}: file or folder '{value}' does not exist")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def recipe_description(path: Path) -> str:
    """The recipe's one-line ``description:`` value (read without validating)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return "(malformed YAML)"
    return str(data.get("description", "")).strip() if isinstance(data, dict) else ""
