"""`t2l inspect`: delta-W arithmetic from the factors, familiarity, the cached index, the CLI,
the familiarity line of `t2l generate`, and the server's /v1/inspect and adapter familiarity."""

from __future__ import annotations

import json

import fastapi.testclient
import pytest
import torch

from t2l_framework.assembly import inspect as inspect_mod
from t2l_framework.assembly.inspect import inspect_run, inspector_for
from t2l_framework.assembly.loading import load_runtime
from t2l_framework.cli import main
from t2l_framework.lora.weights import LoraWeights
from t2l_framework.runtime.inspection import (adapter_cosine, adapter_spread, familiarity, gram_inner, layer_norms,
                                              verdict)
from t2l_framework.serve import create_app
from tests.tiny_world import build_trained_world

TRAIN_DESC = "answer every input with the word apple variant 0"  # toy_0 has variants 0..7; some are held out
STRANGE = "zzz qqq xxyy"  # no word of it is in the encoder's vocabulary


def _weights(seed: int, batch: int, layers=3, r=2, dims={"q": (5, 7), "v": (5, 3)}) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(batch, layers, r, i, generator=g) for m, (i, o) in dims.items()}
    B = {m: torch.randn(batch, layers, o, r, generator=g) for m, (i, o) in dims.items()}
    return LoraWeights(A, B, r, 4.0, True)


def test_factor_arithmetic_equals_full_delta_w():
    q, others = _weights(0, 1), _weights(1, 4)
    full = lambda w, m: w.B[m] @ w.A[m]  # [batch, L, out, in]  # noqa: E731
    for m in q.modules:
        expect = (full(q, m) * full(others, m)).sum(dim=(-1, -2))  # [4, L]
        torch.testing.assert_close(gram_inner(q.A[m], q.B[m], others.A[m], others.B[m]), expect)
    norms = layer_norms(others, q.modules)  # [4, L, M]
    expect = torch.stack([full(others, m).flatten(2).norm(dim=-1) for m in q.modules], -1) * others.scaling
    torch.testing.assert_close(norms, expect)
    dq = torch.cat([full(q, m).flatten() for m in q.modules])
    do = torch.stack([torch.cat([full(others, m)[t].flatten() for m in q.modules]) for t in range(4)])
    torch.testing.assert_close(adapter_cosine(q, others, q.modules), torch.nn.functional.cosine_similarity(do, dq[None]))
    anchor = _weights(2, 1)
    da = torch.cat([full(anchor, m).flatten() for m in q.modules])
    torch.testing.assert_close(adapter_cosine(q, others, q.modules, anchor),
                               torch.nn.functional.cosine_similarity(do - da[None], (dq - da)[None]))


def test_adapter_spread_is_the_share_of_energy_off_the_mean():
    w = _weights(3, 5)
    flat = torch.stack([torch.cat([(w.B[m][t] @ w.A[m][t]).flatten() for m in w.modules]) for t in range(5)])
    expect = 1 - flat.mean(0).square().sum() / flat.square().sum(1).mean()
    assert adapter_spread(w, w.modules) == pytest.approx(float(expect), rel=1e-5)
    same = LoraWeights({m: a[:1].expand_as(a) for m, a in w.A.items()}, {m: b[:1].expand_as(b) for m, b in w.B.items()},
                       w.rank, 4.0, True)
    assert adapter_spread(same, w.modules) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        adapter_spread(_weights(0, 1), w.modules)


def test_adapter_spread_script_reads_a_run(world):
    from tests.benchmark_scripts import load_benchmark

    row = load_benchmark("adapter_spread").spreads(world["run"])
    assert set(row) >= {"training tasks", "within a task"}
    assert all(0.0 <= v <= 1.0 for v in row.values())


def test_familiarity_is_the_percentile_among_the_reference():
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert familiarity(torch.tensor([0.05, 0.25, 0.4, 0.9]), ref).tolist() == [0.0, 50.0, 100.0, 100.0]
    assert verdict(60).startswith("familiar") and verdict(10).startswith("borderline")
    assert verdict(1).startswith("unfamiliar")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_trained_world(tmp_path_factory.mktemp("inspect_world"), "ins")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "inspect_cache"
    monkeypatch.setenv("T2L_CACHE", str(root))
    return root


def test_inspect_run_ranks_neighbours_and_writes_json_and_png(world, tmp_path, cache, monkeypatch):
    rows = inspect_run(world["run"], [TRAIN_DESC, STRANGE], k=3, json_file=tmp_path / "i.json",
                       png_file=tmp_path / "i.png", device="cpu")
    known, strange = rows
    assert known["nearest_descriptions"][0]["task"] == "toy_0"
    assert known["nearest_tasks"][0]["task"] == "toy_0" and known["nearest_tasks"][0]["cosine"] > 0.99
    assert known["familiarity"] > strange["familiarity"]
    assert {t["task"] for t in known["nearest_tasks"]} <= {"toy_0", "toy_1", "toy_2", "toy_3"}  # training tasks only
    assert len(known["norms"]) == 2 and len(known["norms"][0]) == 2  # 2 layers x (q_proj, v_proj)
    assert len(known["closest_adapters"]) == 3 and -1.0 <= known["closest_adapters"][0]["cosine"] <= 1.0001
    saved = json.loads((tmp_path / "i.json").read_text())
    assert saved["inspections"][1]["description"] == STRANGE
    assert (tmp_path / "i.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "i.png").stat().st_size > 10_000
    assert list(cache.glob("inspect/*/index.json"))  # the index is cached ...
    monkeypatch.setattr(inspect_mod, "build_index", lambda *a, **k: pytest.fail("the cached index was rebuilt"))
    again = inspect_run(world["run"], [TRAIN_DESC], k=3, device="cpu")  # ... and read back
    assert again[0]["familiarity"] == known["familiarity"]


def test_held_out_descriptions_are_those_training_held_out(world):
    from t2l_framework.assembly.lookups import load_recipe

    recipe = world["run"] / "recipe.yaml"
    tasks = inspect_mod.run_tasks(load_recipe(recipe, check_files=False), recipe)
    assert list(tasks.train) == ["toy_0", "toy_1", "toy_2", "toy_3"] and list(tasks.unseen) == ["toy_4", "toy_5"]
    for train, held in tasks.train.values():
        assert len(held) == 2 and len(train) == 6 and not set(train) & set(held)


def test_cli_inspect_and_the_familiarity_line_of_generate(world, tmp_path, capsys):
    assert main(["inspect", str(world["run"]), STRANGE, "--json", str(tmp_path / "x.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "familiarity:" in out and "nearest training descriptions" in out and "closest adapters" in out
    assert json.loads((tmp_path / "x.json").read_text())["inspections"][0]["description"] == STRANGE
    assert main(["generate", str(world["run"]), TRAIN_DESC, "-o", str(tmp_path / "a"), "--dtype", "float32"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("familiarity")]
    assert len(line) == 1 and "percentile" in line[0] and "nearest task toy_0" in line[0]


def test_server_answers_carry_familiarity_and_v1_inspect(world):
    runtime = load_runtime(world["run"], dtype="float32")
    inspector = inspector_for(runtime.generator, world["run"] / "recipe.yaml")
    with fastapi.testclient.TestClient(create_app(runtime, inspector=inspector)) as client:
        made = client.post("/v1/adapters", json={"description": TRAIN_DESC}).json()
        assert made["familiarity"]["nearest_tasks"][0]["task"] == "toy_0"
        assert made["familiarity"]["verdict"].split(":")[0] in ("familiar", "borderline", "unfamiliar")
        chat = client.post("/v1/chat/completions", json={"description": STRANGE, "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "red"}]}).json()
        assert chat["t2l"]["familiarity"]["familiarity"] < made["familiarity"]["familiarity"]
        rows = client.post("/v1/inspect", json={"descriptions": [TRAIN_DESC, STRANGE], "top": 2}).json()["data"]
        assert [r["description"] for r in rows] == [TRAIN_DESC, STRANGE] and len(rows[0]["nearest_tasks"]) == 2
        assert client.post("/v1/inspect", json={"descriptions": []}).status_code == 422
    with fastapi.testclient.TestClient(create_app(runtime)) as client:
        assert client.post("/v1/adapters", json={"description": TRAIN_DESC}).json()["familiarity"] is None
        assert client.post("/v1/inspect", json={"descriptions": [TRAIN_DESC]}).status_code == 404
