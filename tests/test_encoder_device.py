"""Descriptions are embedded on the run's device, in length-sorted batches, rows in the given order."""

from __future__ import annotations

import torch
from torch import nn

from t2l_framework.encoders import EmbeddingCache, TransformersEncoder
from t2l_framework.encoders.cache import encode_sorted

TEXTS = ["classify the sentiment of a short movie review as positive or negative", "translate", "sum two numbers",
         "answer", "extract every person name mentioned in the given news paragraph", "rate it"]


class SpyEncoder(nn.Module):
    """Records where ``.to`` placed it and, per encode call, (that device, texts); no real move,
    so any device name can be checked on a CPU-only machine. Row i is [len(text), first char code]."""

    batch_size = 2
    dim = 2

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.placed = torch.device("cpu")
        self.moves: list[torch.device] = []
        self.calls: list[tuple[torch.device, list[str]]] = []

    def to(self, device):
        self.placed = torch.device(device)
        self.moves.append(self.placed)
        return self

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls.append((self.placed, list(texts)))
        return torch.tensor([[float(len(t)), float(ord(t[0]))] for t in texts])


def test_encoded_on_the_given_device_in_length_sorted_batches():
    spy = SpyEncoder()
    out = encode_sorted(spy, TEXTS, device="cuda:1", progress=False)
    assert {str(device) for device, _ in spy.calls} == {"cuda:1"}
    assert spy.moves == [torch.device("cuda:1"), torch.device("cpu")]  # back home: no GPU memory held in training
    assert [len(batch) for _, batch in spy.calls] == [2, 2, 2]
    flat = [t for _, batch in spy.calls for t in batch]
    assert flat == sorted(TEXTS, key=len)
    expected = torch.tensor([[float(len(t)), float(ord(t[0]))] for t in TEXTS])
    torch.testing.assert_close(out, expected)  # rows in the order given, not the sorted one


def test_sorted_batches_equal_one_unsorted_pass(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    enc = TransformersEncoder(str(tmp_path), batch_size=4)
    whole = enc.encode(TEXTS)  # one batch in the given order, padded to the longest
    sorted_rows = EmbeddingCache(enc, TEXTS, device="cpu", progress=False).embeddings
    torch.testing.assert_close(sorted_rows, whole, atol=1e-5, rtol=1e-5)


def test_a_cache_hit_does_not_encode(tmp_path):
    spy = SpyEncoder()
    first = EmbeddingCache(spy, TEXTS, cache_dir=tmp_path, device="cpu", progress=False)
    n_calls = len(spy.calls)
    again = EmbeddingCache(spy, TEXTS, cache_dir=tmp_path, device="cuda", progress=False)
    assert n_calls == 3 and len(spy.calls) == n_calls and spy.moves[-1] == torch.device("cpu")
    torch.testing.assert_close(again.embeddings, first.embeddings)


def test_each_rank_embeds_on_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    spy = SpyEncoder()
    encode_sorted(spy, TEXTS, device="cuda", progress=False)
    assert {str(device) for device, _ in spy.calls} == {"cuda:3"}
