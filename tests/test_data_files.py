"""The data-file helper (plain and gzip files read alike) and the bundle's MANIFEST.json against the files."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from t2l_framework.data.files import read_bytes, read_text, text_lines
from t2l_framework.data.tasks import load_tasks
from t2l_framework.errors import T2LError
from t2l_framework.eval.benchmarks import read_jsonl

DATA = Path(__file__).resolve().parents[1] / "data"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text())


@pytest.mark.parametrize("entry", [e for e in MANIFEST if e["sha256"]], ids=lambda e: e["file"])
def test_manifest_matches_the_stored_files(entry):
    """Content sha256 / bytes / rows are those of the verbatim source; ``stored`` is the .gz on disk."""
    path = DATA / entry["file"]
    content = read_bytes(path)
    assert hashlib.sha256(content).hexdigest() == entry["sha256"]
    assert len(content) == entry["bytes"]
    if entry["file"].endswith(".jsonl.gz"):
        assert content.count(b"\n") == entry["rows"]
    elif entry["file"].endswith(".json.gz"):
        assert len(json.loads(content)) == entry["rows"]
    if path.suffix == ".gz":
        raw = path.read_bytes()
        assert entry["stored"]["bytes"] == len(raw)
        assert entry["stored"]["sha256"] == hashlib.sha256(raw).hexdigest()
        assert raw[4:8] == b"\0\0\0\0", "written with gzip -n: no timestamp, so the bytes are reproducible"


def test_every_bundled_data_file_is_in_the_manifest():
    listed = {e["file"] for e in MANIFEST}
    on_disk = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file()
               and p.name not in ("MANIFEST.json", "README.md") and not p.match("t2l/tasks/*/metadata.yaml")}
    assert on_disk == listed - {"t2l/tasks/*/metadata.yaml"}
    big_plain = [f for f in on_disk if f.endswith((".jsonl", ".json")) and (DATA / f).stat().st_size > 100_000]
    assert not big_plain, "large JSON(L) files are stored gzip-compressed so the tree stays small"


def test_gz_and_plain_read_the_same(tmp_path):
    """load_tasks and read_jsonl give the same records from a .jsonl.gz as from the plain file."""
    tasks = [{"task": "t0", "descriptions": ["Say yes."]}, {"task": "t1", "descriptions": ["Say no. \u00e9\u4e2d"]}]
    instances = [{"task": t, "split": s, "input": f"{t} {s} {i}", "output": ["x"]}
                 for t in ("t0", "t1") for s in ("train", "test") for i in range(2)]
    text = {"tasks": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tasks),
            "instances": "".join(json.dumps(r) + "\n" for r in instances)}
    for name, body in text.items():
        (tmp_path / f"{name}.jsonl").write_text(body, encoding="utf-8")
        (tmp_path / f"{name}.jsonl.gz").write_bytes(gzip.compress(body.encode("utf-8")))
    plain = load_tasks(tmp_path / "tasks.jsonl", tmp_path / "instances.jsonl")
    packed = load_tasks(tmp_path / "tasks.jsonl.gz", tmp_path / "instances.jsonl.gz")
    assert plain == packed and packed["t1"].descriptions == ["Say no. \u00e9\u4e2d"] and len(packed["t0"].test) == 2
    assert read_jsonl(tmp_path / "tasks.jsonl.gz") == tasks
    assert read_text(tmp_path / "tasks.jsonl.gz") == text["tasks"]
    assert [n for n, _ in text_lines(tmp_path / "instances.jsonl.gz")] == list(range(1, len(instances) + 1))


def test_bad_gzip_and_bad_lines_name_the_file(tmp_path):
    not_gz = tmp_path / "tasks.jsonl.gz"
    not_gz.write_text('{"task": "t0"}\n')  # plain text under a .gz name
    with pytest.raises(T2LError, match=r"tasks\.jsonl\.gz: not a valid gzip file"):
        load_tasks(not_gz, not_gz)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"task": "t0"}\n' * 1000)[:-40])  # truncated download
    with pytest.raises(T2LError, match=r"cut\.jsonl\.gz: not a valid gzip file"):
        read_jsonl(cut)
    bad_line = tmp_path / "bad.jsonl.gz"
    bad_line.write_bytes(gzip.compress(b'{"task": "t0", "descriptions": ["a"]}\n{oops\n'))
    with pytest.raises(T2LError, match=r"bad\.jsonl\.gz:2: not valid JSON"):
        load_tasks(bad_line, bad_line)
    with pytest.raises(T2LError, match=r"nowhere\.jsonl\.gz: cannot read the file"):
        read_text(tmp_path / "nowhere.jsonl.gz")
