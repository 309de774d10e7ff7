"""The server under concurrent load: adapter creation, PEFT downloads, streaming chat and
``/healthz`` at once against uvicorn on 127.0.0.1, in a bounded loop. Every answer equals its
sequential answer, and the runtime is only touched on the model thread (read-only names aside)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zipfile

import pytest
import torch

from t2l_framework.assembly import load_runtime
from tests.tiny_world import build_trained_world

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from safetensors.torch import load as load_safetensors  # noqa: E402

from t2l_framework.serve import create_app  # noqa: E402
from t2l_framework.serve.adapters import adapter_id  # noqa: E402

USER = [{"role": "user", "content": "red blue small"}]
DESCRIPTIONS = [f"answer every input with the word {w} variant 3" for w in ("apple", "river", "stone", "tiger")]
ROUNDS = 2  # each worker's loop: bounded, so the test stops by itself
MAX_TOKENS = 5
# Attributes fixed at load, safe to read on any thread (T2LRuntime's docstring), and the one
# call made while the app is built: everything else must happen on the model thread.
ANY_THREAD = {"name", "identity", "base_model_name", "request_encoder"}


class ThreadLog:
    """The real runtime, recording on which thread each attribute is read or each method is called."""

    def __init__(self, runtime):
        self._runtime = runtime
        self.touches: list[tuple[str, str]] = []  # (thread name, attribute); list.append is atomic

    def __getattr__(self, name):
        value = getattr(self._runtime, name)
        if not callable(value):
            self.touches.append((threading.current_thread().name, name))
            return value

        def called(*args, **kwargs):  # a bound method may be handed to another thread: log the call
            self.touches.append((threading.current_thread().name, name))
            return value(*args, **kwargs)

        return called


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    world = build_trained_world(tmp_path_factory.mktemp("serve_concurrency"), "serve_concurrency")
    return load_runtime(world["run"], dtype="float32")  # answers are compared: never the CPU's pick


def _sequential(runtime, tmp_path) -> dict[str, dict]:
    """Per description: the answer, the adapter id and the PEFT tensors, one call at a time."""
    out = {}
    for i, d in enumerate(DESCRIPTIONS):
        weights = runtime.adapters([d])
        folder = runtime.export(weights, [tmp_path / f"seq{i}"])[0]
        out[d] = {"text": runtime.chat([USER], weights, max_new_tokens=MAX_TOKENS)[0].text,
                  "id": adapter_id(runtime.identity, d),
                  "tensors": load_safetensors((folder / "adapter_model.safetensors").read_bytes())}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _streamed_text(client: httpx.Client, description: str) -> str:
    body = {"description": description, "messages": USER, "max_tokens": MAX_TOKENS, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as res:
        assert res.status_code == 200
        chunks = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: {")]
    assert all("error" not in c for c in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_concurrent_creation_download_streaming_and_health_equal_sequential_answers(runtime, tmp_path):
    expected = _sequential(runtime, tmp_path)
    logged = ThreadLog(runtime)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(logged, max_batch=8, batch_window_ms=20), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)

    results: dict[str, list] = {"created": [], "zips": [], "streamed": [], "health": []}
    errors: list[BaseException] = []

    def worker(kind: str) -> None:
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                for _ in range(ROUNDS):
                    for d in DESCRIPTIONS if kind != "health" else range(10):
                        if kind == "create":
                            res = client.post("/v1/adapters", json={"description": d})
                            assert res.status_code == 200, res.text
                            results["created"].append((d, res.json()["id"]))
                        elif kind == "download":
                            made = client.post("/v1/adapters", json={"description": d}).json()
                            res = client.get(made["download_url"])
                            assert res.status_code == 200, res.text
                            results["zips"].append((d, res.content))
                        elif kind == "stream":
                            results["streamed"].append((d, _streamed_text(client, d)))
                        else:
                            results["health"].append(client.get("/healthz").status_code)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread below
            errors.append(exc)

    kinds = ["create", "download", "download", "stream", "stream", "stream", "health"]
    workers = [threading.Thread(target=worker, args=(k,)) for k in kinds]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
        assert not any(w.is_alive() for w in workers), "a worker hung"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    if errors:
        raise errors[0]

    assert results["health"] == [200] * 10 * ROUNDS
    assert len(results["created"]) == ROUNDS * len(DESCRIPTIONS)
    assert all(i == expected[d]["id"] for d, i in results["created"])
    assert len(results["streamed"]) == 3 * ROUNDS * len(DESCRIPTIONS)
    for d, text in results["streamed"]:
        assert text == expected[d]["text"], d
    assert len(results["zips"]) == 2 * ROUNDS * len(DESCRIPTIONS)
    for d, data in results["zips"]:
        tensors = load_safetensors(zipfile.ZipFile(io.BytesIO(data)).read("adapter_model.safetensors"))
        assert tensors.keys() == expected[d]["tensors"].keys()
        for key, value in tensors.items():
            assert torch.equal(value, expected[d]["tensors"][key]), (d, key)

    elsewhere = sorted({(t, name) for t, name in logged.touches
                        if name not in ANY_THREAD and not t.startswith("t2l-model")})
    assert not elsewhere, f"runtime used off the model thread: {elsewhere}"
    assert {name for t, name in logged.touches if t.startswith("t2l-model")} >= {"chat", "adapters", "adapter_writer"}


def test_the_request_encoder_has_its_own_tokenizer_and_the_same_ids(runtime):
    encode = runtime.request_encoder()
    assert encode.keywords["tokenizer"] is not runtime.tokenizer
    assert encode(USER, MAX_TOKENS) == runtime.encode(USER, MAX_TOKENS)


def test_an_adapter_writer_owns_a_cpu_copy_of_the_weights(runtime, tmp_path):
    weights = runtime.adapters([DESCRIPTIONS[0]])
    write = runtime.adapter_writer(weights)
    module = weights.modules[0]
    before = weights.A[module].clone()
    with torch.inference_mode():
        weights.A[module].add_(1.0)  # the cached adapter changing later must not reach the writer's copy
    folder = write(tmp_path / "adapter")
    tensors = load_safetensors((folder / "adapter_model.safetensors").read_bytes())
    first = next(k for k in sorted(tensors) if f"{module}.lora_A" in k and ".0." in k)
    assert torch.equal(tensors[first], before[0, 0])
