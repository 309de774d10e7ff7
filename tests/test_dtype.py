"""dtype 'auto': bfloat16 only where the hardware has it natively; one rule for every command.

Each capability is simulated (CPU flags, OS, GPU answers), so these tests say the same on any
machine; ``T2L_CPU_BF16`` is the switch CI uses to run the dtype-sensitive tests under the
other pick.
"""

import pytest
import torch

from t2l_framework.errors import T2LError
from t2l_framework.llm import dtype as dt


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(dt.CPU_BF16_ENV, raising=False)
    dt.detected_cpu_bf16.cache_clear()
    yield
    dt.detected_cpu_bf16.cache_clear()


def _cpu(flags=(), system="linux", machine="x86_64", capability="AVX2", darwin_feat_bf16=None):
    return dt.CpuInfo(frozenset(flags), system, machine, capability, darwin_feat_bf16)


CPUS = {  # name -> (simulated CPU, what auto picks on it)
    "AVX2 only (EPYC Rome)": (_cpu({"avx2", "fma"}), torch.float32),
    "AVX-512 without bf16 (Skylake-SP)": (_cpu({"avx2", "avx512f", "avx512bw"}, capability="AVX512"), torch.float32),
    "AVX512_BF16 (EPYC Genoa, Cooper Lake)": (_cpu({"avx2", "avx512f", "avx512_bf16"}, capability="AVX512"),
                                              torch.bfloat16),
    "AMX (Sapphire Rapids)": (_cpu({"avx2", "avx512f", "amx_bf16", "amx_tile"}, capability="AVX512"), torch.bfloat16),
    "Apple M1": (_cpu(system="darwin", machine="arm64", capability="DEFAULT", darwin_feat_bf16=False), torch.float32),
    "Apple M2 and later": (_cpu(system="darwin", machine="arm64", capability="DEFAULT", darwin_feat_bf16=True),
                           torch.bfloat16),
    "Apple silicon, sysctl unreadable": (_cpu(system="darwin", machine="arm64", capability="DEFAULT"), torch.float32),
    "Intel Mac": (_cpu(system="darwin", machine="x86_64", capability="AVX2"), torch.float32),
    "Arm Linux with BF16 (Graviton3)": (_cpu({"fp", "asimd", "sve", "bf16"}, machine="aarch64", capability="SVE256"),
                                        torch.bfloat16),
    "Arm Linux without BF16 (Graviton2)": (_cpu({"fp", "asimd"}, machine="aarch64", capability="DEFAULT"),
                                           torch.float32),
    "unreadable /proc/cpuinfo": (_cpu(capability=""), torch.float32),
}


@pytest.mark.parametrize("name", list(CPUS))
def test_auto_on_cpu_follows_the_simulated_capability(monkeypatch, name):
    cpu, expected = CPUS[name]
    monkeypatch.setattr(dt, "this_cpu", lambda: cpu)
    choice = dt.pick_dtype("auto", "cpu")
    assert choice.dtype == expected, name
    assert choice.reason.startswith("auto")
    if expected == torch.float32:
        assert "emulated" in choice.describe()


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, torch.float32),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),
])
def test_auto_reads_the_linux_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(dt, "cpu_flags", lambda: flags)
    monkeypatch.setattr(dt.sys, "platform", "linux")
    monkeypatch.setattr(dt.platform, "machine", lambda: "x86_64")
    assert dt.pick_dtype("auto", "cpu").dtype == expected


def test_cpu_flags_read_the_arm_features_line(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n")
    real = dt.Path
    monkeypatch.setattr(dt, "Path", lambda p: real(cpuinfo) if p == "/proc/cpuinfo" else real(p))
    assert {"sve", "bf16"} <= dt.cpu_flags()


@pytest.mark.parametrize("bf16_supported,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert dt.pick_dtype("auto", "cuda").dtype == expected
    assert dt.pick_dtype("auto").dtype == expected  # no device given: cuda when there is one
    # the CPU override is about the CPU only
    monkeypatch.setenv(dt.CPU_BF16_ENV, "0" if bf16_supported else "1")
    assert dt.pick_dtype("auto", "cuda").dtype == expected


def test_other_devices_get_float32():
    assert dt.pick_dtype("auto", "mps").dtype == torch.float32
    assert dt.pick_dtype("auto", "meta").dtype == torch.float32


@pytest.mark.parametrize("forced,expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_the_environment_variable_forces_what_auto_believes_about_the_cpu(monkeypatch, forced, expected):
    for name in ("AVX2 only (EPYC Rome)", "AMX (Sapphire Rapids)"):
        dt.detected_cpu_bf16.cache_clear()
        monkeypatch.setattr(dt, "this_cpu", lambda cpu=CPUS[name][0]: cpu)
        monkeypatch.setenv(dt.CPU_BF16_ENV, forced)
        choice = dt.pick_dtype("auto", "cpu")
        assert choice.dtype == expected and f"{dt.CPU_BF16_ENV}={forced}" in choice.reason
        monkeypatch.delenv(dt.CPU_BF16_ENV)
        assert dt.pick_dtype("auto", "cpu").dtype == CPUS[name][1]  # read on every call, not cached
    monkeypatch.setenv(dt.CPU_BF16_ENV, "yes")
    with pytest.raises(T2LError, match=r"T2L_CPU_BF16: expected 0 or 1"):
        dt.pick_dtype("auto", "cpu")
    assert dt.pick_dtype("float32", "cpu").dtype == torch.float32  # explicit names never look


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
    monkeypatch.setattr(dt, "this_cpu", lambda: CPUS["AVX2 only (EPYC Rome)"][0])
    lines = []
    loaded = load_base_model(BaseModelConfig(name_or_path=str(tmp_path)), device="cpu", say=lines.append)
    assert loaded.model.dtype == torch.float32 and loaded.dtype.name == "float32"
    assert lines and "dtype float32 (auto:" in lines[0]
    dt.detected_cpu_bf16.cache_clear()
    monkeypatch.setattr(dt, "this_cpu", lambda: CPUS["AMX (Sapphire Rapids)"][0])
    lines.clear()
    loaded = load_base_model(BaseModelConfig(name_or_path=str(tmp_path)), device="cpu", say=lines.append)
    assert loaded.model.dtype == torch.bfloat16 and "dtype bfloat16 (auto: CPU with native bf16 (AMX_BF16))" in lines[0]
