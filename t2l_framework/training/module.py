"""The LightningModule: the math of one training step for each ``training.mode``.

- ``sft``: description embedding -> hypernetwork -> per-sample LoRA on the frozen base LLM ->
  cross-entropy on response tokens (label smoothing, NEFTune, L2 on generated weights);
- ``lora``: the same loss with one learned LoRA shared by every sample (the paper's oracle /
  multi-task LoRA baselines), through the same batched LoRA path so comparisons are fair;
- ``recon``: regress a library of task LoRAs (z-scored per element), no LLM forward.

The frozen base model and the embedding table are deliberately *not* submodules: the
optimizer, the checkpoints and DeepSpeed only ever see the generator's parameters.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import ROUGEScore

from t2l_framework.lora.weights import LoraWeights, ModuleShapes


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


def lr_lambda(warmup: int, total: int, kind: str):
    """Linear warm-up, then cosine / linear decay to 0 or constant."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


class T2LModule(L.LightningModule):
    """Trains ``generator`` (a HyperNetwork, or a LearnedLora in lora mode).

    base_model: frozen causal LM whose targeted layers carry ``injection`` (sft / lora modes).
    desc_embeddings: [n_descriptions, enc_dim], rows indexed by a batch's ``desc_idx``.
    recon_targets: (A, B) dicts of [n_tasks, n_layers, ...] target LoRAs (recon mode).
    """

    def __init__(self, recipe: Any, generator: nn.Module, base_model: nn.Module | None = None,
                 injection: Any = None, desc_embeddings: torch.Tensor | None = None,
                 recon_targets: tuple[dict, dict] | None = None, tokenizer: Any = None):
        super().__init__()
        self.recipe = recipe
        self.mode = recipe.training.mode
        self.generator = generator
        # Not submodules (see module docstring): stored around nn.Module.__setattr__.
        object.__setattr__(self, "base_model", base_model)
        object.__setattr__(self, "injection", injection)
        object.__setattr__(self, "desc_embeddings", desc_embeddings)
        self.recon_stats = self._recon_stats(recon_targets) if recon_targets else None
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
        if self.recon_stats is not None:
            self.recon_stats = {k: {m: t.to(self.device) for m, t in d.items()} for k, d in self.recon_stats.items()}

    # --- the losses --------------------------------------------------------------------
    def generate_weights(self, desc_idx: torch.Tensor) -> LoraWeights:
        emb = self.desc_embeddings[desc_idx.to(self.desc_embeddings.device)] if self.desc_embeddings is not None else None
        return self.generator(emb)

    @contextmanager
    def _neftune(self, seq_len: int):
        """NEFTune: uniform noise on input embeddings, seeded by the step so resumes are exact."""
        alpha = float(self.recipe.training.neftune_alpha)
        if not self.training or alpha <= 0:
            yield
            return
        gen = torch.Generator(device="cpu").manual_seed(int(self.recipe.training.seed) * 7919 + self.global_step)

        def hook(module, args, output):
            scale = alpha / math.sqrt(seq_len * output.shape[-1])
            noise = (torch.rand(output.shape, generator=gen) * 2 - 1) * scale
            return output + noise.to(output.device, output.dtype)

        handle = self.base_model.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def lm_loss(self, batch: dict, weights: LoraWeights, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on response tokens; logits are computed only where labels exist.

        Returns (loss, token accuracy).
        """
        model = self.base_model
        backbone = getattr(model, model.base_model_prefix)
        input_ids, labels = batch["input_ids"], batch["labels"]
        with self.injection.use(weights), self._neftune(input_ids.shape[1]):
            hidden = backbone(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = F.cross_entropy(logits, targets[keep], label_smoothing=label_smoothing)
        acc = (logits.argmax(-1) == targets[keep]).float().mean()
        return loss, acc

    def recon_loss(self, batch: dict, weights: LoraWeights) -> torch.Tensor:
        """MSE between generated and target LoRAs, both z-scored per element over the library."""
        stats, task_idx = self.recon_stats, batch["task_idx"]
        losses = []
        for part, gen in (("A", weights.A), ("B", weights.B)):
            for m, g in gen.items():
                mean, std = stats[f"{part}_mean"][m], stats[f"{part}_std"][m]
                target = stats[f"{part}_target"][m][task_idx]
                losses.append(F.mse_loss((g - mean) / std, (target - mean) / std))
        return torch.stack(losses).mean()

    @staticmethod
    def _recon_stats(targets: tuple[dict, dict]) -> dict:
        A, B = targets
        stats = {"A_target": A, "B_target": B}
        for part, d in (("A", A), ("B", B)):
            stats[f"{part}_mean"] = {m: t.mean(0) for m, t in d.items()}
            stats[f"{part}_std"] = {m: t.std(0, unbiased=False).clamp_min(1e-6) if t.shape[0] > 1
                                    else torch.ones_like(t[0]) for m, t in d.items()}
        return stats

    def _step(self, batch: dict, train: bool) -> tuple[torch.Tensor, dict]:
        weights = self.generate_weights(batch["desc_idx"]) if self.mode != "lora" else self.generator()
        if self.mode == "recon":
            loss = self.recon_loss(batch, weights)
            return loss, {"loss": loss}
        smoothing = float(self.recipe.training.label_smoothing) if train else 0.0
        ce, acc = self.lm_loss(batch, weights, smoothing)
        loss = ce
        logs = {"ce": ce, "token_acc": acc}
        l2 = float(self.recipe.training.l2_penalty)
        if l2 > 0 and self.mode == "sft":
            reg = torch.stack([w.pow(2).mean() for d in (weights.A, weights.B) for w in d.values()]).mean()
            loss = loss + l2 * reg
            logs["l2"] = reg
        logs["loss"] = loss
        return loss, logs

    # --- Lightning hooks ----------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Dropout (hypernetwork trunk, LoRA input) draws from the global RNG: seeding it by
        # (seed, micro-batch, rank) makes a resumed run draw what an uninterrupted one would.
        accum = int(self.recipe.trainer.accumulate_grad_batches)
        micro = self.global_step * accum + batch_idx % accum
        torch.manual_seed(hash((int(self.recipe.training.seed), micro, self.global_rank)) % 2**63)
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
        if self.tokenizer is not None and batch_idx < int(self.recipe.eval.val_generation_batches) and "answers" in batch:
            self._update_rouge(batch)

    def _update_rouge(self, batch: dict) -> None:
        """Greedy answers with each sample's own generated adapter, scored by ROUGE-L."""
        from t2l_framework.eval.generation import greedy_generate, prompt_ids_from_batch

        weights = self.generate_weights(batch["desc_idx"]) if self.mode == "sft" else self.generator()
        preds = greedy_generate(self.base_model, self.tokenizer, prompt_ids_from_batch(batch), self.injection,
                                weights, int(self.recipe.eval.max_new_tokens))
        self.val_rouge.update(preds, [list(a) for a in batch["answers"]])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.val_loss.reset()
        if self.mode != "recon":
            self.log("val/token_acc", self.val_token_acc.compute(), prog_bar=True)
            self.val_token_acc.reset()
        if self.val_rouge.update_count:
            self.log("val/rougeL", self.val_rouge.compute()["rougeL_fmeasure"], prog_bar=True)
            self.val_rouge.reset()

    def configure_optimizers(self):
        t = self.recipe.training
        params = [p for p in self.generator.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(t.lr), weight_decay=float(t.weight_decay))
        total = int(self.recipe.trainer.max_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(t.warmup_steps), total, t.scheduler))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

