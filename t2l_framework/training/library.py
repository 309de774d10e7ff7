"""``training.mode: library``: one run trains a separate LoRA for every training task at once.

The trainable module is a bank of LoRA factors with one row per task (``TaskLoraBank``):
A[m]: [n_tasks, n_layers, r, in], B[m]: [n_tasks, n_layers, out, r]. A batch gathers the rows
of its samples' tasks into a ``LoraWeights`` with one adapter per sample, which the batched
per-sample LoRA path (``lora/batched.py``) applies as it does T2L's generated adapters; so N
task LoRAs cost about one multi-task LoRA run of the same steps (``benchmarks/library_cost.py``).
The gather's backward scatters each sample's gradient into its task's row only.

Plain AdamW would still move the rows of tasks absent from a step (their momentum and weight
decay), so a task's LoRA would not be what training it alone on its own steps gives.
``TaskRowAdamW`` updates only the rows that received a gradient, with a step count per row:
each row follows AdamW over exactly the steps its task was in (DDP-safe: it reads the reduced
gradients). The learning-rate schedule and gradient clipping stay global to the run.

The result is a library folder (``RunFolder.library``): one ordinary PEFT adapter per task,
the layout ``training.mode: recon`` reads (``data.lora_library``), plus ``library.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from t2l_framework.atomic import write_text_atomic
from t2l_framework.console import say
from t2l_framework.lora.weights import LoraWeights, ModuleShapes

SUMMARY_FILE = "library.json"


class TaskLoraBank(nn.Module):
    """One trainable LoRA per task, with PEFT's init (A kaiming-uniform, B zero).

    task_ids: the tasks, in the order of the data module's ``task_idx``.
    init: ``shared``: every task starts from the same A, as LoRAs trained one by one with one
    seed do, so two tasks' delta W differ only by what training taught them and a recon network
    learns that, not each task's random start; ``per_task``: an independent A per task.
    forward(task_idx [batch]) -> LoraWeights with one adapter per sample (its task's row).
    """

    def __init__(self, shapes: ModuleShapes, task_ids: list[str], rank: int, alpha: float, use_rslora: bool = True,
                 init: str = "shared"):
        super().__init__()
        if init not in ("shared", "per_task"):
            raise ValueError(f"TaskLoraBank: init must be 'shared' or 'per_task', got {init!r}")
        self.shapes, self.task_ids = shapes, list(task_ids)
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        n = len(self.task_ids)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for m, (fan_in, fan_out) in shapes.shapes.items():
            a = torch.empty(n if init == "per_task" else 1, shapes.n_layers, rank, fan_in)
            for t in range(a.shape[0]):
                for i in range(shapes.n_layers):
                    nn.init.kaiming_uniform_(a[t, i], a=math.sqrt(5))  # PEFT's default for lora_A
            self.A[m] = nn.Parameter(a.expand(n, -1, -1, -1).clone())
            self.B[m] = nn.Parameter(torch.zeros(n, shapes.n_layers, fan_out, rank))

    @property
    def n_tasks(self) -> int:
        return len(self.task_ids)

    def forward(self, task_idx: torch.Tensor) -> LoraWeights:
        """task_idx: [batch] rows of the bank -> A[m]: [batch, n_layers, r, in], B[m]: [batch, n_layers, out, r]."""
        idx = task_idx.to(next(iter(self.A.values())).device)
        return LoraWeights({m: a[idx] for m, a in self.A.items()}, {m: b[idx] for m, b in self.B.items()},
                           self.rank, self.alpha, self.use_rslora)

    def task(self, t: int) -> LoraWeights:
        """Task t's adapter (batch 1), detached."""
        return self(torch.tensor([t])).detach()

    def build_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """The optimizer ``T2LModule`` uses for this module (see ``TaskRowAdamW``)."""
        return TaskRowAdamW(list(self.parameters()), lr=lr, weight_decay=weight_decay)


class TaskRowAdamW(torch.optim.Optimizer):
    """AdamW over parameters whose dim 0 is the task, stepping only the rows that got a gradient.

    A row (task) takes a step when any parameter of the group has a non-zero gradient in it;
    its moments and bias corrections use its own step count (``state['step']``: [n_tasks]),
    so each row follows torch's AdamW exactly over the steps its task was in. Absent rows keep
    their values and moments, and take no weight decay.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            present = torch.zeros(params[0].shape[0], dtype=torch.bool, device=params[0].device)
            for p in params:
                present |= p.grad.ne(0).flatten(1).any(1)
            rows = present.nonzero()[:, 0]
            if not len(rows):
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], device=p.device)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                step = state["step"].index_add_(0, rows, torch.ones_like(rows, dtype=state["step"].dtype))[rows]
                shape = (-1,) + (1,) * (p.dim() - 1)
                g, w = p.grad[rows], p[rows]
                m = state["exp_avg"][rows].lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1 = (1 - beta1 ** step).view(shape)
                bias2_sqrt = (1 - beta2 ** step).sqrt().view(shape)
                w.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled decay, as torch's AdamW
                w.sub_(group["lr"] * (m / bias1) / ((v.sqrt() / bias2_sqrt).add_(group["eps"])))
                p[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows] = w, m, v
        return loss

    def task_steps(self) -> torch.Tensor | None:
        """[n_tasks]: optimizer steps each row took (None before the first step)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    return self.state[p]["step"].detach().cpu()
        return None


def task_examples(dataset, n_batches: int, n_tasks: int) -> torch.Tensor:
    """[n_tasks]: training rows of each task in the first ``n_batches`` batches of the stream.

    The stream is a pure function of (seed, batch index), so this counts what the run consumed
    (on every rank together) without any bookkeeping during training."""
    counts = torch.zeros(n_tasks, dtype=torch.long)
    for i in range(n_batches):
        counts += torch.bincount(dataset[i]["task_idx"], minlength=n_tasks)
    return counts


@torch.no_grad()
def task_train_losses(model: nn.Module, injection, bank: TaskLoraBank, examples: list[list], pad_token_id: int,
                      per_task: int = 8, batch_size: int = 16) -> list[float]:
    """Mean answer-token cross-entropy (no smoothing, dropout or noise) of each task's LoRA on the
    first ``per_task`` training examples of its task; examples[t]: [(input_ids, labels), ...]."""
    from t2l_framework.data.encoding import pad_batch

    rows = [(t, ex) for t, pool in enumerate(examples) for ex in pool[:per_task]]
    totals, counts = torch.zeros(bank.n_tasks), torch.zeros(bank.n_tasks)
    backbone = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([ex for _, ex in chunk], pad_token_id).items()}
        task_idx = torch.tensor([t for t, _ in chunk])
        with injection.use(bank(task_idx)):
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, targets[keep], reduction="none")
        sample = keep.nonzero()[:, 0]
        per_row = loss.new_zeros(len(chunk)).index_add_(0, sample, loss) / torch.bincount(
            sample, minlength=len(chunk)).clamp(min=1)
        has = torch.bincount(sample, minlength=len(chunk)).cpu() > 0
        totals.index_add_(0, task_idx[has], per_row.cpu()[has])
        counts.index_add_(0, task_idx[has], torch.ones(int(has.sum())))
    return [float(t / c) if c else float("nan") for t, c in zip(totals, counts)]


def save_library(cfg, run, pieces, trainer) -> Path:
    """Write ``RunFolder.library``: one PEFT adapter folder per task (``library/TASK_ID/``) and
    ``library.json`` (per task: optimizer steps, training examples, final train loss)."""
    from t2l_framework.lora.peft_io import export_peft_adapter

    bank: TaskLoraBank = pieces.trainable.to("cpu")
    out = run.library
    out.mkdir(parents=True, exist_ok=True)
    for t, tid in enumerate(bank.task_ids):
        export_peft_adapter(bank.task(t), out / tid, cfg.base_model.name_or_path, paths=pieces.injection.paths)
    steps = trainer.optimizers[0].task_steps() if trainer.optimizers else None
    n_batches = (int(trainer.global_step) * int(cfg.trainer.accumulate_grad_batches)
                 * int(getattr(trainer, "world_size", 1) or 1))
    dm = pieces.datamodule
    dataset = dm.train_dataset()
    examples = task_examples(dataset, n_batches, bank.n_tasks)
    model = pieces.base.model
    bank.to(next(model.parameters()).device)
    losses = task_train_losses(model, pieces.injection, bank, dataset.examples, dm.pad_token_id)
    bank.to("cpu")
    summary = {
        "base_model": cfg.base_model.name_or_path,
        "lora": {"rank": bank.rank, "alpha": bank.alpha, "use_rslora": bank.use_rslora,
                 "target_modules": list(bank.shapes.modules)},
        "run_steps": int(trainer.global_step), "max_steps": int(cfg.trainer.max_steps),
        "parameters": sum(p.numel() for p in bank.parameters()),
        "parameters_per_task": sum(p[0].numel() for p in bank.parameters()),
        "train_loss": "mean answer-token cross-entropy of the task's LoRA on its first 8 training examples",
        "tasks": {tid: {"steps": int(steps[t]) if steps is not None else 0, "examples": int(examples[t]),
                        "train_loss": round(losses[t], 5)} for t, tid in enumerate(bank.task_ids)},
    }
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    say(f"saved {bank.n_tasks} task LoRAs to {out} ({summary['parameters'] / 1e6:.2f}M parameters)")
    return out
