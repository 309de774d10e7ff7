"""No partial state: a writer that fails half-way through a file leaves the older file (or none),
never a torn one, and no temporary file behind. Each writer of a run or adapter folder is
made to fail after writing half of its bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from t2l_framework.config import HypernetConfig, LoraConfig
from t2l_framework.eval import report, sni_report
from t2l_framework.hypernet import HyperNetwork, checkpoint
from t2l_framework.lora import peft_io
from t2l_framework.lora.weights import LoraWeights, ModuleShapes

SHAPES = ModuleShapes(2, {"q_proj": (16, 16), "v_proj": (16, 8)})
LORA = LoraConfig(rank=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
PATHS = {m: [f"model.layers.{i}.self_attn.{m}" for i in range(2)] for m in ("q_proj", "v_proj")}


class Crash(RuntimeError):
    """The failure injected half-way through a write."""


def _torn_write_text(self: Path, data: str, *args, **kwargs):
    with open(self, "wb") as f:
        f.write(data.encode()[: max(1, len(data) // 2)])
    raise Crash("disk full half-way")


def _torn_write_bytes(self: Path, data: bytes):
    with open(self, "wb") as f:
        f.write(data[: max(1, len(data) // 2)])
    raise Crash("disk full half-way")


def _torn_save_file(tensors, filename, metadata=None):
    data = safetensors_bytes(tensors, metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    raise Crash("disk full half-way")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _net(seed: int) -> HyperNetwork:
    torch.manual_seed(seed)
    cfg = HypernetConfig(head="per_layer", task_dim=8, layer_emb_dim=4, module_emb_dim=4, latent_size=16)
    net = HyperNetwork(SHAPES, 12, cfg, LORA, base_model="tiny")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net


def _weights(seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(1, 2, 2, SHAPES.shapes[m][0], generator=g) for m in ("q_proj", "v_proj")}
    B = {m: torch.randn(1, 2, SHAPES.shapes[m][1], 2, generator=g) for m in ("q_proj", "v_proj")}
    return LoraWeights(A, B, 2, 4.0, True)


@pytest.mark.parametrize("where", ["weights", "config"])
def test_save_pretrained_fails_half_way_and_keeps_the_older_checkpoint(tmp_path, monkeypatch, where):
    folder = tmp_path / "hypernet"
    _net(0).save_pretrained(folder)
    (folder / "notes.txt").write_text("kept")  # not ours: left alone
    before = _snapshot(folder)
    if where == "weights":
        monkeypatch.setattr(checkpoint, "save_file", _torn_save_file)
    else:
        monkeypatch.setattr(Path, "write_text", _torn_write_text)
    with pytest.raises(Crash):
        _net(1).save_pretrained(folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before  # same files, same bytes, no temporary left
    loaded = HyperNetwork.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), _net(0).state_dict().values()))


def test_save_pretrained_fails_into_an_empty_folder_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", _torn_save_file)
    with pytest.raises(Crash):
        _net(0).save_pretrained(tmp_path / "hypernet")
    assert list((tmp_path / "hypernet").iterdir()) == []


def test_peft_export_fails_half_way_and_keeps_the_older_adapter(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    peft_io.export_peft_adapter(_weights(0), out, "tiny", paths=PATHS)
    before = _snapshot(out)
    monkeypatch.setattr(peft_io, "save_file", _torn_save_file)
    with pytest.raises(Crash):
        peft_io.export_peft_adapter(_weights(1), out, "tiny", paths=PATHS)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left
    with pytest.raises(Crash):
        peft_io.export_peft_adapter(_weights(1), tmp_path / "fresh", "tiny", paths=PATHS)
    assert not (tmp_path / "fresh").exists()


RESULTS = {"benchmarks": {"arc_easy": {"metric": "acc", "n": 2}},
           "scores": {"base": {"arc_easy": {"score": 0.5, "se": 0.1}}},
           "model": {"name": "tiny"}, "settings": {"protocol": "chat", "n_descriptions": 1}}


def test_eval_reports_fail_half_way_and_keep_the_older_files(tmp_path, monkeypatch):
    report.write_outputs(RESULTS, [{"id": 1}], tmp_path)
    before = _snapshot(tmp_path)
    newer = json.loads(json.dumps(RESULTS))
    newer["scores"]["base"]["arc_easy"]["score"] = 0.75
    monkeypatch.setattr(Path, "write_bytes", _torn_write_bytes)
    with pytest.raises(Crash):
        report.write_outputs(newer, [{"id": 2}], tmp_path)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda self, path, **kw: _torn_write_bytes(Path(path), b"x" * 99))
    with pytest.raises(Crash):
        report.bar_chart(newer, tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes() == before["results.png"]


def test_sni_report_fails_half_way_and_keeps_the_older_report(tmp_path, monkeypatch):
    items = [{"task": "t", "answers": ["yes"]}, {"task": "u", "answers": ["no"]}]
    results = {"t2l": sni_report.score(["yes", "no"], items), "base": sni_report.score(["maybe", "no"], items)}
    sni_report.write_report(tmp_path, {"Seen": results}, {"Seen": items})
    before = _snapshot(tmp_path)
    newer = {"t2l": sni_report.score(["no", "no"], items), "base": results["base"]}
    monkeypatch.setattr(Path, "write_text", _torn_write_text)
    with pytest.raises(Crash):
        sni_report.write_report(tmp_path, {"Seen": newer}, {"Seen": items})
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def test_replacing_a_folder_keeps_the_old_one_when_the_new_one_cannot_be_renamed_in(tmp_path, monkeypatch):
    import os

    from t2l_framework import atomic

    out = tmp_path / "adapter"
    peft_io.export_peft_adapter(_weights(0), out, "tiny", paths=PATHS)
    before = _snapshot(out)
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(dst) == out and ".old." not in str(src):  # the new folder's rename into place
            raise OSError("rename refused")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename refused"):
        peft_io.export_peft_adapter(_weights(1), out, "tiny", paths=PATHS)
    monkeypatch.undo()
    assert _snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    peft_io.export_peft_adapter(_weights(1), out, "tiny", paths=PATHS)  # and a working rename replaces it
    assert _snapshot(out) != before and [p.name for p in tmp_path.iterdir()] == ["adapter"]


class _CountingEncoder:
    """A text encoder of fixed vectors that counts how often it encodes."""

    def __init__(self):
        self.calls = 0
        self.metadata = {"class": "counting"}

    def encode(self, texts):
        self.calls += 1
        return torch.arange(len(texts) * 4, dtype=torch.float32).reshape(len(texts), 4)


def test_embedding_cache_fails_half_way_and_is_not_read_back_torn(tmp_path, monkeypatch):
    from t2l_framework.encoders import EmbeddingCache
    from t2l_framework.encoders import cache as encoder_cache

    encoder, texts = _CountingEncoder(), ["say yes", "say no"]
    monkeypatch.setattr(encoder_cache, "save_file", _torn_save_file)
    with pytest.raises(Crash):
        EmbeddingCache(encoder, texts, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no torn file for the next run to read
    cache = EmbeddingCache(encoder, texts, cache_dir=tmp_path, progress=False)
    again = EmbeddingCache(encoder, texts, cache_dir=tmp_path, progress=False)
    assert encoder.calls == 2 and torch.equal(again.embeddings, cache.embeddings)


def test_reference_import_writes_each_file_whole(tmp_path, monkeypatch):
    from tests.test_parity import reference_state, write_reference

    from t2l_framework.hypernet.reference_import import import_reference

    ref = write_reference(tmp_path / "ref", reference_state("L"), "L")
    run = import_reference(ref, tmp_path / "run")
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    monkeypatch.setattr(Path, "write_text", _torn_write_text)
    with pytest.raises(Crash):
        import_reference(ref, run, force=True)
    monkeypatch.undo()
    after = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before


def test_write_text_atomic_fails_half_way_and_keeps_the_older_file(tmp_path, monkeypatch):
    from t2l_framework.atomic import write_text_atomic

    target = tmp_path / "descriptions.json"
    write_text_atomic(target, '{"old": true}\n')
    monkeypatch.setattr(Path, "write_text", _torn_write_text)
    with pytest.raises(Crash):
        write_text_atomic(target, '{"new": "' + "x" * 100 + '"}\n')
    monkeypatch.undo()
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["descriptions.json"]  # no temporary left


# Writers that may write a final path directly, because the folder they write into is itself a
# temporary one renamed into place (or never a run/adapter folder): file -> why.
DIRECT_WRITERS_ALLOWED = {
    "serve/adapters.py": "stages a zip inside a TemporaryDirectory",
    "data/fetch.py": "writes parts into the temporary folder that save_part renames in",
    "eval/sandbox/runner.py": "writes inside the code sandbox's scratch folder",
}


def test_every_file_writer_in_the_package_goes_through_a_temporary():
    """A static guard: ``X.write_text(...)`` / ``open(X, "w")`` on anything but a temporary (``tmp``)
    path is a torn file waiting to happen; use ``atomic_file`` / ``write_text_atomic``."""
    import re

    package = Path(__file__).resolve().parents[1] / "t2l_framework"
    direct = re.compile(r"""(?<!tmp)\.write_(text|bytes)\(|\bopen\((?!tmp\b)[^)]*,\s*["'](w|wb|a)["']""")
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if direct.search(line) and rel not in DIRECT_WRITERS_ALLOWED:
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "direct writes to final paths:\n" + "\n".join(found)
