"""dtype 'auto': bfloat16 only where the hardware has it natively; one rule for every command."""

import pytest
import torch

from t2l_framework.errors import T2LError
from t2l_framework.llm import dtype as dt


@pytest.fixture(autouse=True)
def _fresh_cache():
    dt.cpu_has_native_bf16.cache_clear()
    yield
    dt.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, torch.float32),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),
])
def test_auto_on_cpu_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(dt, "cpu_flags", lambda: flags)
    choice = dt.pick_dtype("auto", "cpu")
    assert choice.dtype == expected
    assert choice.reason.startswith("auto")
    if expected == torch.float32:
        assert "emulated" in choice.describe()


def test_auto_on_gpu_is_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dt.pick_dtype("auto", "cuda").dtype == torch.bfloat16


def test_explicit_names_win_and_bad_names_name_the_key():
    assert dt.pick_dtype("bfloat16", "cpu").dtype == torch.bfloat16
    assert dt.pick_dtype("fp32").dtype == torch.float32
    with pytest.raises(T2LError, match="base_model.dtype: unknown dtype 'int8'"):
        dt.pick_dtype("int8")


def test_load_base_model_says_which_dtype(tmp_path, monkeypatch, tiny_mistral):
    from t2l_framework.config import BaseModelConfig
    from t2l_framework.llm.loading import load_base_model
    from tests.test_llm import CHATML, word_tokenizer

    tiny_mistral().save_pretrained(tmp_path)
    word_tokenizer(CHATML).save_pretrained(tmp_path)
    monkeypatch.setattr(dt, "cpu_flags", lambda: {"avx2"})
    lines = []
    loaded = load_base_model(BaseModelConfig(name_or_path=str(tmp_path)), device="cpu", say=lines.append)
    assert loaded.model.dtype == torch.float32 and loaded.dtype.name == "float32"
    assert lines and "dtype float32 (auto:" in lines[0]
