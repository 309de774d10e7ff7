"""The LightningModule and the math of a training step; each ``training.mode``'s object
(``training/modes``) picks the batch's adapters and its loss from these pieces:

- ``sft``: description embedding -> hypernetwork -> per-sample LoRA on the frozen base LLM ->
  cross-entropy on response tokens (label smoothing, NEFTune, LoRA input dropout, L2 on
  generated weights), averaged per sample and then over samples as in the T2L reference;
- ``lora``: the same loss with one learned LoRA shared by every sample (the paper's oracle /
  multi-task LoRA baselines), through the same batched LoRA path so comparisons are fair;
- ``library``: the same loss with one learned LoRA per training task, each sample carrying its
  task's (``training/library.py``: a bank gathered by the batch's ``task_idx``);
- ``recon``: regress a library of task LoRAs with the reference's L1 losses, no LLM forward.

The loss functions are plain functions of tensors (``sft_token_loss``, ``generated_l2``,
``recon_l1``) so tests check them against the reference's formulas directly.

The frozen base model and the embedding table are deliberately *not* submodules: the
optimizer, the checkpoints and DeepSpeed only ever see the generator's parameters.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import ROUGEScore

from t2l_framework.training.delta_w_l1 import delta_w_l1
from t2l_framework.lora.weights import LoraWeights, ModuleShapes
from t2l_framework.training.modes import TrainingMode, mode_for

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from t2l_framework.lora.batched import LoraInjection


class LearnedLora(nn.Module):
    """One trainable LoRA (PEFT's init: A random, B zero) that ignores the task embedding.

    forward(task_emb [batch, dim]) -> LoraWeights with batch 1, broadcast over the batch.
    """

    def __init__(self, shapes: ModuleShapes, rank: int, alpha: float, use_rslora: bool = True):
        super().__init__()
        self.shapes, self.rank, self.alpha, self.use_rslora = shapes, rank, alpha, use_rslora
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for m, (fan_in, fan_out) in shapes.shapes.items():
            a = torch.empty(1, shapes.n_layers, rank, fan_in)
            for i in range(shapes.n_layers):
                nn.init.kaiming_uniform_(a[0, i], a=math.sqrt(5))  # PEFT's default for lora_A
            self.A[m] = nn.Parameter(a)
            self.B[m] = nn.Parameter(torch.zeros(1, shapes.n_layers, fan_out, rank))

    def forward(self, task_emb: torch.Tensor | None = None) -> LoraWeights:
        return LoraWeights(dict(self.A), dict(self.B), self.rank, self.alpha, self.use_rslora)


def param_groups(generator: nn.Module, lr: float, head_bias_factor: float = 1.0) -> list[dict]:
    """AdamW parameter groups: the head's biases ("head.*.bias": the adapter every task starts
    from) at ``lr * head_bias_factor``, everything else trainable at ``lr``. One group when the
    factor is 1 or the module has no head (a ``LearnedLora``), so nothing changes by default."""
    named = [(n, p) for n, p in generator.named_parameters() if p.requires_grad]
    bias = [p for n, p in named if n.startswith("head.") and n.endswith(".bias")]
    if head_bias_factor == 1.0 or not bias:
        return [{"params": [p for _, p in named], "lr": lr}]
    ids = {id(p) for p in bias}
    return [{"params": [p for _, p in named if id(p) not in ids], "lr": lr, "name": "trunk+head weights"},
            {"params": bias, "lr": lr * head_bias_factor, "name": "head bias"}]


def lr_lambda(warmup: int, total: int, kind: str):
    """Linear warm-up from 0, then cosine / linear decay to 0 or constant.

    The same factors as transformers' ``get_{cosine,linear,constant}_schedule_with_warmup``
    (the reference trains with ``get_scheduler("linear", ...)``): step/warmup while warming up.
    """

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def warmup_steps(training, max_steps: int) -> int:
    """``training.warmup_ratio`` x max_steps when set (the reference's warmup_frac), else ``warmup_steps``;
    both are checked with the recipe (``config.RANGES``)."""
    ratio = float(training.warmup_ratio)
    return int(ratio * max_steps) if ratio > 0 else int(training.warmup_steps)


def sft_token_loss(logits: torch.Tensor, targets: torch.Tensor, sample: torch.Tensor, n_samples: int,
                   label_smoothing: float, reduction: str) -> torch.Tensor:
    """Cross-entropy over answer tokens, reduced like the reference's ``compute_loss``.

    logits: [tokens, vocab] (answer positions only); targets: [tokens]; sample: [tokens], the
    batch row of each token. per_sample: each row's token mean, then the mean over rows that
    have answer tokens (every sample weighs the same, however long its answer); per_token:
    one mean over all tokens.
    """
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")  # [tokens]
    if reduction == "per_token":
        return loss.mean()
    totals = loss.new_zeros(n_samples).index_add_(0, sample, loss)
    counts = torch.bincount(sample, minlength=n_samples)
    has = counts > 0
    return (totals[has] / counts[has]).mean()


def neftune_noise(embeds: torch.Tensor, alpha: float, seq_len: int, seed: int) -> torch.Tensor:
    """NEFTune's noise for input embeddings ``embeds`` [batch, seq, dim]: uniform in
    +-alpha / sqrt(seq_len * dim), same shape, device and dtype.

    Drawn on ``embeds``' device by a generator seeded with ``seed`` (of the step, micro-batch and rank): no CPU tensor
    and copy per step on a GPU, and the same noise for the same step after a resume. Drawn
    in float32 and cast, so a CPU run draws exactly what a CPU generator always gave.
    """
    gen = torch.Generator(device=embeds.device).manual_seed(seed)
    scale = alpha / math.sqrt(seq_len * embeds.shape[-1])
    noise = torch.rand(embeds.shape, generator=gen, device=embeds.device, dtype=torch.float32)
    return noise.mul_(2).sub_(1).mul_(scale).to(embeds.dtype)


def generated_l2(weights: LoraWeights, reduction: str) -> torch.Tensor:
    """The reference's penalty on generated factors: for every module type,
    mean(A^2) + mean(B^2), each mean over samples, layers and entries, summed over module
    types (``reduction="sum"``); ``"mean"`` averages the 2 x modules terms instead."""
    terms = torch.stack([w.float().pow(2).mean() for m in weights.A for w in (weights.A[m], weights.B[m])])
    return terms.sum() if reduction == "sum" else terms.mean()


def recon_l1(weights: LoraWeights, target_A: dict[str, torch.Tensor], target_B: dict[str, torch.Tensor],
             kind: str, delta_w_scaling: float, std: tuple[dict, dict] | None = None) -> torch.Tensor:
    """The reference's reconstruction losses (``recon_trainer.compute_loss``), mean over module types.

    weights: the generated adapters, A[m]: [batch, layers, r, in], B[m]: [batch, layers, out, r];
    target_A / target_B: the library adapters of the same tasks, same shapes.
    delta_w: L1(B @ A x s, B* @ A* x s), the delta W of every layer (s = delta_w_scaling),
    computed without storing it (``training/delta_w_l1.py``);
    factors: L1(A, A*) / 2 + L1(B, B*) / 2. L1 is the mean absolute error over all entries.
    factors_z: the same on z-scores, |A - A*| / std_A entry by entry (the shared mean cancels);
    std: the library's per-entry std over tasks ({m: [layers, r, in]}, {m: [layers, out, r]}),
    as the network's output scale holds it (``HyperNetwork.set_output_standardisation``).

    One difference remains in delta_w: the reference's network emits factors sqrt(s) times
    larger and divides them by sqrt(s) when it writes an adapter; ours emits the adapter
    itself. The loss as a function of the generated adapter is the same; the scale of the
    head's outputs (and so its effective step size) is not.
    """
    losses = []
    for m in weights.A:
        A, B, tA, tB = weights.A[m].float(), weights.B[m].float(), target_A[m].float(), target_B[m].float()
        if kind == "delta_w":
            losses.append(delta_w_l1(A, B, tA, tB, delta_w_scaling))
        elif kind == "factors_z":
            if std is None:
                raise ValueError("recon_l1: factors_z needs the library's std")
            sA, sB = std[0][m].to(A.device, torch.float32), std[1][m].to(B.device, torch.float32)
            losses.append(((A - tA).abs() / sA).mean() / 2 + ((B - tB).abs() / sB).mean() / 2)
        else:
            losses.append(F.l1_loss(A, tA) / 2 + F.l1_loss(B, tB) / 2)
    return torch.stack(losses).mean()


@dataclass(frozen=True)
class StepSettings:
    """The recipe values ``T2LModule``'s steps and optimizer read, read once (``from_recipe``);
    what only one mode's loss reads, that mode reads (``training/modes``)."""

    seed: int
    accumulate_grad_batches: int
    max_steps: int
    lr: float
    weight_decay: float
    lr_head_bias: float
    warmup_steps: int
    scheduler: str
    neftune_alpha: float
    compile: bool
    compile_backend: str
    lora_dropout: float
    label_smoothing: float
    loss_reduction: str
    val_generation_batches: int
    max_new_tokens: int

    @classmethod
    def from_recipe(cls, recipe) -> "StepSettings":
        t, max_steps = recipe.training, int(recipe.trainer.max_steps)
        return cls(
            seed=int(t.seed), accumulate_grad_batches=int(recipe.trainer.accumulate_grad_batches),
            max_steps=max_steps, lr=float(t.lr), weight_decay=float(t.weight_decay),
            lr_head_bias=float(t.lr_head_bias), warmup_steps=warmup_steps(t, max_steps), scheduler=str(t.scheduler),
            neftune_alpha=float(t.neftune_alpha), compile=bool(t.compile), compile_backend=str(t.compile_backend),
            lora_dropout=float(recipe.lora.dropout), label_smoothing=float(t.label_smoothing),
            loss_reduction=str(t.loss_reduction), val_generation_batches=int(recipe.eval.val_generation_batches),
            max_new_tokens=int(recipe.eval.max_new_tokens))


class T2LModule(L.LightningModule):
    """Trains ``generator`` (a HyperNetwork, a LearnedLora in lora mode, a TaskLoraBank in library
    mode); the recipe's ``TrainingMode`` says which adapters a batch gets and what its loss is.

    base_model: frozen causal LM whose targeted layers carry ``injection`` (all modes but recon).
    desc_embeddings: [n_descriptions, enc_dim], rows indexed by a batch's ``desc_idx``.
    recon_targets: (A, B) dicts of [n_tasks, n_layers, ...] target LoRAs (``TrainingMode.loss_targets``).
    mode: the run's mode object; by default built from ``recipe``.
    """

    def __init__(self, recipe: DictConfig, generator: nn.Module, base_model: nn.Module | None = None,
                 injection: LoraInjection | None = None, desc_embeddings: torch.Tensor | None = None,
                 recon_targets: tuple[dict, dict] | None = None, tokenizer: Any = None,
                 mode: TrainingMode | None = None):
        super().__init__()
        self.settings = StepSettings.from_recipe(recipe)
        self.mode = mode if mode is not None else mode_for(recipe)
        self.generator = generator
        # Not submodules (see module docstring): stored around nn.Module.__setattr__.
        object.__setattr__(self, "base_model", base_model)
        object.__setattr__(self, "injection", injection)
        object.__setattr__(self, "desc_embeddings", desc_embeddings)
        self.recon_targets = recon_targets  # (A, B): [n_tasks, n_layers, ...] per module type
        self.val_loss = MeanMetric()
        self.val_token_acc = MeanMetric()
        self.val_rouge = ROUGEScore(rouge_keys="rougeL")
        object.__setattr__(self, "tokenizer", tokenizer)

    # --- device placement of the hidden pieces ----------------------------------------
    def on_fit_start(self) -> None:
        self._place_hidden()

    def on_validation_start(self) -> None:
        self._place_hidden()

    def _place_hidden(self) -> None:
        if self.base_model is not None:
            self.base_model.to(self.device)
        if self.desc_embeddings is not None:
            object.__setattr__(self, "desc_embeddings", self.desc_embeddings.to(self.device))
        if self.recon_targets is not None:
            self.recon_targets = tuple({m: t.to(self.device) for m, t in d.items()} for d in self.recon_targets)

    # --- the losses --------------------------------------------------------------------
    def generate_weights(self, desc_idx: torch.Tensor) -> LoraWeights:
        emb = self.desc_embeddings[desc_idx.to(self.desc_embeddings.device)] if self.desc_embeddings is not None else None
        return self.generator(emb)

    def _neftune_seed(self) -> int | None:
        """NEFTune's seed for this (seed, step, micro-batch, rank), None when no noise applies
        (evaluation, or alpha 0): every rank and every accumulated micro-batch draws its own noise,
        and a resumed run draws what an uninterrupted one would."""
        if not self.training or self.settings.neftune_alpha <= 0:
            return None
        # ints only: Python's hash of a tuple of ints is the same in every process and run
        return hash((self.settings.seed, 7919, self.global_step, getattr(self, "_micro_in_step", 0),
                     self.global_rank)) % 2**63

    @contextmanager
    def _neftune(self, seq_len: int):
        """NEFTune: uniform noise on input embeddings, seeded (``_neftune_seed``) so resumes are exact."""
        seed = self._neftune_seed()
        if seed is None:
            yield
            return
        alpha = self.settings.neftune_alpha

        def hook(module, args, output):
            return output + neftune_noise(output, alpha, seq_len, seed)

        handle = self.base_model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _hidden_states(self, backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder stack's last hidden states ``[batch, seq, hidden]`` (LoRA factors already set).

        With ``training.compile`` the stack runs through ``torch.compile``: the embeddings (and
        NEFTune's noise) are computed outside the graph and passed as ``inputs_embeds``, so no
        hook is added and removed inside a compiled region every step (in a trial, a simple
        per-step hook closure was replayed with an earlier step's value) and the noise's
        generator does not break the graph; the LoRA factors are module attributes, which
        dynamo lifts to graph inputs.
        """
        if not self.settings.compile:
            with self._neftune(input_ids.shape[1]):
                return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        compiled = getattr(self, "_compiled_backbone", None)
        if compiled is None:  # hidden like the base itself: never a submodule, never in a checkpoint
            compiled = torch.compile(backbone, backend=self.settings.compile_backend, dynamic=None)
            object.__setattr__(self, "_compiled_backbone", compiled)
        embeds = self.base_model.get_input_embeddings()(input_ids)
        seed = self._neftune_seed()
        if seed is not None:
            embeds = embeds + neftune_noise(embeds, self.settings.neftune_alpha, input_ids.shape[1], seed)
        return compiled(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def lm_loss(self, batch: dict, weights: LoraWeights, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on response tokens (``sft_token_loss``); logits are computed only where
        labels exist. LoRA input dropout (``lora.dropout``) applies in training steps only.

        Returns (loss, token accuracy).
        """
        model = self.base_model
        backbone = getattr(model, model.base_model_prefix)
        input_ids, labels = batch["input_ids"], batch["labels"]
        dropout = self.settings.lora_dropout if self.training else 0.0
        with self.injection.use(weights, dropout=dropout):
            hidden = self._hidden_states(backbone, input_ids, batch["attention_mask"])
        targets = labels[:, 1:]
        keep = targets != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        sample = keep.nonzero()[:, 0]  # batch row of each kept token, in the order of hidden[keep]
        loss = sft_token_loss(logits, targets[keep], sample, keep.shape[0], label_smoothing,
                              self.settings.loss_reduction)
        acc = (logits.argmax(-1) == targets[keep]).float().mean()
        return loss, acc

    def adapters_for(self, batch: dict) -> LoraWeights:
        """The batch's adapters, as the mode makes them (``TrainingMode.adapters``)."""
        return self.mode.adapters(self, batch)

    def _step(self, batch: dict, train: bool) -> tuple[torch.Tensor, dict]:
        return self.mode.loss(self, batch, self.adapters_for(batch), train)

    # --- Lightning hooks ----------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Dropout (hypernetwork trunk, LoRA input) draws from the global RNG: seeding it by
        # (seed, micro-batch, rank) makes a resumed run draw what an uninterrupted one would.
        accum = self.settings.accumulate_grad_batches
        self._micro_in_step = batch_idx % accum  # NEFTune's seed reads it (``_neftune_seed``)
        micro = self.global_step * accum + self._micro_in_step
        torch.manual_seed(hash((self.settings.seed, micro, self.global_rank)) % 2**63)
        loss, logs = self._step(batch, train=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in logs.items()}, prog_bar=False,
                      batch_size=batch["desc_idx"].shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logs = self._step(batch, train=False)
        n = batch["desc_idx"].shape[0]
        self.val_loss.update(logs.get("ce", loss), n)
        if "token_acc" in logs:
            self.val_token_acc.update(logs["token_acc"], n)
        if self.tokenizer is not None and batch_idx < self.settings.val_generation_batches and "answers" in batch:
            self._update_rouge(batch)

    def _update_rouge(self, batch: dict) -> None:
        """Greedy answers with each sample's own generated adapter, scored by ROUGE-L."""
        from t2l_framework.runtime.greedy import greedy_generate, prompt_ids_from_batch

        weights = self.adapters_for(batch)
        preds = greedy_generate(self.base_model, self.tokenizer, prompt_ids_from_batch(batch), self.injection,
                                weights, self.settings.max_new_tokens)
        self.val_rouge.update(preds, [list(a) for a in batch["answers"]])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        if self.val_token_acc.update_count:  # the modes whose loss is on answer tokens
            self.log("val/token_acc", self.val_token_acc.compute(), prog_bar=True)
            self.val_token_acc.reset()
        if self.val_rouge.update_count:
            self.log("val/rougeL", self.val_rouge.compute()["rougeL_fmeasure"], prog_bar=True)
            self.val_rouge.reset()

    def configure_optimizers(self):
        s = self.settings
        build = getattr(self.generator, "build_optimizer", None)  # a module that needs its own (library mode)
        opt = (build(lr=s.lr, weight_decay=s.weight_decay) if build is not None
               else torch.optim.AdamW(param_groups(self.generator, s.lr, s.lr_head_bias),
                                      lr=s.lr, weight_decay=s.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.warmup_steps, s.max_steps, s.scheduler))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
