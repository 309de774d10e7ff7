"""Training losses and schedule against the T2L reference's formulas (sft_trainer.compute_loss,
get_loss_batch's L2 term, recon_trainer.compute_loss, transformers' get_scheduler).

Each reference formula is written out here the way the reference computes it (full logits,
layer-major flattening), independently of the framework's vectorised code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t2l_framework.assembly import load_recipe
from t2l_framework.errors import T2LError
from t2l_framework.lora import LoraWeights, inject_lora
from t2l_framework.training.delta_w_l1 import delta_w_l1
from t2l_framework.training.module import (T2LModule, generated_l2, lr_lambda, recon_l1, sft_token_loss,
                                           warmup_steps)


def reference_compute_loss(labels, logits, equally_weight_sample, label_smoothing):
    """sft_trainer.compute_loss of the reference, as written there."""
    bs, vocab = logits.shape[0], logits.shape[-1]
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    max_seq_len = shift_labels.shape[1]
    seq_len = torch.where(shift_labels != -100, 1, 0).sum(-1, keepdim=True)
    shift_logits, shift_labels = shift_logits.view(-1, vocab), shift_labels.view(-1)
    if equally_weight_sample:
        loss = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=label_smoothing)(shift_logits, shift_labels)
        return (loss.view(bs, max_seq_len) / seq_len).sum(-1).mean()
    return torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(shift_logits, shift_labels)


def ours_from_full_logits(labels, logits, reduction, label_smoothing):
    """The framework's path: logits at answer positions only, plus each token's batch row."""
    targets = labels[:, 1:]
    keep = targets != -100
    return sft_token_loss(logits[:, :-1][keep], targets[keep], keep.nonzero()[:, 0], labels.shape[0],
                          label_smoothing, reduction)


def batch_with_uneven_answers(seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 9, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (3, 9), generator=g)
    labels[0, :7] = -100   # 2 answer tokens
    labels[1, :2] = -100   # 7 answer tokens
    labels[2, :5] = -100   # 4 answer tokens, then padding
    labels[2, 8:] = -100
    return labels, logits


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sft_loss_is_the_references_per_sample_mean(smoothing):
    labels, logits = batch_with_uneven_answers()
    ref = reference_compute_loss(labels, logits, True, smoothing)
    torch.testing.assert_close(ours_from_full_logits(labels, logits, "per_sample", smoothing), ref)
    token_mean = reference_compute_loss(labels, logits, False, smoothing)
    torch.testing.assert_close(ours_from_full_logits(labels, logits, "per_token", smoothing), token_mean)
    assert abs(ref - token_mean) > 1e-3, "uneven answers: the two reductions must differ"


def test_per_sample_loss_weighs_every_sample_equally():
    labels, logits = batch_with_uneven_answers()
    per_row = [ours_from_full_logits(labels[i:i + 1], logits[i:i + 1], "per_sample", 0.1) for i in range(3)]
    torch.testing.assert_close(ours_from_full_logits(labels, logits, "per_sample", 0.1), torch.stack(per_row).mean())


def _weights(seed=0, batch=2, layers=3, rank=2):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (6, 6), "v_proj": (6, 4)}
    A = {m: torch.randn(batch, layers, rank, i, generator=g) for m, (i, o) in shapes.items()}
    B = {m: torch.randn(batch, layers, o, rank, generator=g) * 0.5 for m, (i, o) in shapes.items()}
    return LoraWeights(A, B, rank, 4.0, True)


def test_l2_is_the_references_sum_over_modules():
    w = _weights()
    expected = 0.0
    for m in w.modules:  # the reference: per module, A and B of all layers x samples stacked layer-major
        A = w.A[m].transpose(0, 1).reshape(-1, *w.A[m].shape[2:])
        B = w.B[m].transpose(0, 1).reshape(-1, *w.B[m].shape[2:])
        expected = expected + (A ** 2).mean() + (B ** 2).mean()
    torch.testing.assert_close(generated_l2(w, "sum"), expected)
    torch.testing.assert_close(generated_l2(w, "mean"), expected / 4)


def test_recon_l1_delta_w_and_factors():
    w, t = _weights(0), _weights(1)
    delta = torch.stack([
        F.l1_loss(torch.einsum("blor,blri->bloi", w.B[m], w.A[m]) * 1e4,
                  torch.einsum("blor,blri->bloi", t.B[m], t.A[m]) * 1e4) for m in w.modules]).mean()
    torch.testing.assert_close(recon_l1(w, t.A, t.B, "delta_w", 1e4), delta)
    factors = torch.stack([(w.A[m] - t.A[m]).abs().mean() / 2 + (w.B[m] - t.B[m]).abs().mean() / 2
                           for m in w.modules]).mean()
    torch.testing.assert_close(recon_l1(w, t.A, t.B, "factors", 1e4), factors)
    assert recon_l1(t, t.A, t.B, "delta_w", 1e4) == 0


@pytest.mark.parametrize("leading, out, inp", [((3, 5), 24, 40), ((2,), 1500, 900)])  # the second spans chunks
def test_delta_w_l1_equals_the_plain_loss_in_value_and_gradients(leading, out, inp):
    """The chunked, recomputing loss is F.l1_loss of the two products, gradients included (float64,
    so a sign flip from rounding cannot hide a wrong formula)."""
    gen = torch.Generator().manual_seed(0)
    r = 4

    def factors(requires_grad):
        A = torch.randn(*leading, r, inp, generator=gen, dtype=torch.float64)
        B = torch.randn(*leading, out, r, generator=gen, dtype=torch.float64)
        return A.requires_grad_(requires_grad), B.requires_grad_(requires_grad)

    (A, B), (tA, tB) = factors(True), factors(True)
    plain = F.l1_loss(B @ A * 3.0, tB @ tA * 3.0)
    plain_grads = torch.autograd.grad(plain, (A, B, tA, tB))
    ours = delta_w_l1(A, B, tA, tB, 3.0)
    torch.testing.assert_close(ours, plain)
    for got, want in zip(torch.autograd.grad(ours, (A, B, tA, tB)), plain_grads):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="do not match"):
        delta_w_l1(A, B, tA[..., :-1], tB, 1.0)


@pytest.mark.parametrize("kind, hf_name", [("linear", "linear"), ("cosine", "cosine"),
                                           ("constant", "constant_with_warmup")])
def test_schedule_equals_transformers(kind, hf_name):
    from transformers import get_scheduler

    total, warm = 50, 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_scheduler(hf_name, opt, num_warmup_steps=warm, num_training_steps=total)
    ours = lr_lambda(warm, total, kind)
    for step in range(total):
        assert ours(step) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12), step


def test_warmup_ratio_is_a_fraction_of_max_steps():
    cfg = load_recipe(overrides=["training.warmup_ratio=0.2", "training.warmup_steps=7"], check_files=False)
    assert warmup_steps(cfg.training, 1_180_000) == 236_000
    cfg = load_recipe(overrides=["training.warmup_steps=7"], check_files=False)
    assert warmup_steps(cfg.training, 1_180_000) == 7
    with pytest.raises(T2LError, match="training.warmup_ratio"):  # refused when the recipe loads
        load_recipe(overrides=["training.warmup_ratio=1.5"], check_files=False)


@pytest.fixture
def sft_module(tiny_llama):
    """A T2LModule whose generator is fixed LoRA weights (B non-zero), on a tiny Llama."""
    model = tiny_llama()
    injection = inject_lora(model, ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(3)
    shapes = injection.shapes
    A = {m: torch.randn(1, shapes.n_layers, 4, i, generator=g) * 0.3 for m, (i, o) in shapes.shapes.items()}
    B = {m: torch.randn(1, shapes.n_layers, o, 4, generator=g) * 0.3 for m, (i, o) in shapes.shapes.items()}
    weights = LoraWeights(A, B, 4, 8.0, True)

    def make(*overrides):
        cfg = load_recipe(overrides=["training.neftune_alpha=0", *overrides], check_files=False)
        return T2LModule(cfg, torch.nn.Identity(), model, injection), weights, injection

    return make


def _lm_batch():
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 128, (3, 10), generator=g)
    labels = input_ids.clone()
    labels[0, :8] = -100
    labels[1, :3] = -100
    labels[2, :6] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def test_lm_loss_equals_the_reference_on_the_adapted_model(sft_module):
    module, weights, injection = sft_module("lora.dropout=0.0")
    module.eval()
    batch = _lm_batch()
    with torch.no_grad():
        ours, _ = module.lm_loss(batch, weights, 0.1)
        with injection.use(weights):
            logits = injection.model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, reference_compute_loss(batch["labels"], logits, True, 0.1), atol=1e-5, rtol=1e-5)


def test_lora_dropout_only_in_training_steps(sft_module):
    module, weights, _ = sft_module("lora.dropout=0.5")
    batch = _lm_batch()
    with torch.no_grad():
        module.eval()
        eval_1, _ = module.lm_loss(batch, weights, 0.0)
        eval_2, _ = module.lm_loss(batch, weights, 0.0)
        module.train()
        torch.manual_seed(0)
        train_1, _ = module.lm_loss(batch, weights, 0.0)
        torch.manual_seed(1)
        train_2, _ = module.lm_loss(batch, weights, 0.0)
    assert eval_1 == eval_2
    assert abs(train_1 - train_2) > 1e-4 and abs(train_1 - eval_1) > 1e-4
    no_dropout, _, _ = sft_module("lora.dropout=0.0")
    no_dropout.train()
    with torch.no_grad():
        torch.testing.assert_close(no_dropout.lm_loss(batch, weights, 0.0)[0], eval_1)
    assert math.isfinite(float(train_1))
