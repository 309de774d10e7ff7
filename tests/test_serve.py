"""`t2l serve` and the runtime behind it, on a tiny trained run: API, errors, streaming,
adapter cache, batching across requests, PEFT zips, and the web page in a real browser."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from t2l_framework.errors import T2LError
from t2l_framework.assembly import load_runtime
from tests.tiny_world import build_trained_world

fastapi_testclient = pytest.importorskip("fastapi.testclient", reason="the serve extra is not installed")
from t2l_framework.serve import create_app  # noqa: E402
from t2l_framework.serve.schemas import MAX_DESCRIPTION_CHARS, MAX_TOKENS  # noqa: E402

APPLE = "answer every input with the word apple variant 1"
TIGER = "answer every input with the word tiger variant 1"
USER = [{"role": "user", "content": "red blue small"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_trained_world(tmp_path_factory.mktemp("serve_world"), "serve")


@pytest.fixture(scope="module")
def runtime(world):
    return load_runtime(world["run"], dtype="float32")  # tests compare numbers: never the CPU's pick


@pytest.fixture(scope="module")
def client(runtime):
    # A wide window so requests sent from several threads reliably meet in one batch.
    with fastapi_testclient.TestClient(create_app(runtime, max_batch=8, batch_window_ms=250)) as c:
        yield c


def _chat(client, **body):
    body.setdefault("messages", USER)
    body.setdefault("max_tokens", 5)
    return client.post("/v1/chat/completions", json=body)


def _stats(client) -> dict:
    return client.get("/v1/stats").json()


# --- runtime ------------------------------------------------------------------------------

def test_load_run_accepts_run_and_hypernet_folders_and_names_bad_ones(world, runtime, tmp_path):
    assert load_runtime(world["run"] / "hypernet", dtype="float32").identity == runtime.identity
    with pytest.raises(T2LError, match="not a T2L run folder"):
        load_runtime(tmp_path)
    with pytest.raises(T2LError, match="no such folder"):
        load_runtime(tmp_path / "missing")
    (tmp_path / "lora" / "adapter").mkdir(parents=True)
    (tmp_path / "lora" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(T2LError, match="LoRA-baseline run"):
        load_runtime(tmp_path / "lora")


def test_mixed_batch_rows_match_each_row_alone(runtime):
    weights = runtime.adapters([APPLE, TIGER])  # one hypernetwork forward for both
    assert weights.batch_size == 2
    # The tiny world trains a few steps from the reference's zero-weight heads, so its adapters
    # are still weak: amplify them so that rows with an adapter really answer differently.
    weights = weights.with_factors(weights.A, {m: b * 200 for m, b in weights.B.items()})
    prompts = ["red blue small", "green fast", "cold warm bright"]
    rows, budgets = [weights.select(0), None, weights.select(1)], [5, 3, 6]
    together = runtime.chat(prompts, rows, max_new_tokens=budgets)
    alone = [runtime.chat([p], [w], max_new_tokens=m)[0] for p, w, m in zip(prompts, rows, budgets)]
    assert [c.text for c in together] == [c.text for c in alone]
    # Per-row budgets in one generate: each row stops where it stops alone, a row cut by its budget
    # has exactly its budget, and a row that meets EOS earlier stops there. Whether a row meets EOS
    # depends on the CPU's float32 kernels (the amplified adapters sit near ties), so the test asks
    # only that at least two rows with different budgets ran to them.
    assert [(c.completion_tokens, c.finish_reason) for c in together] == [
        (c.completion_tokens, c.finish_reason) for c in alone]
    for c, m in zip(together, budgets):
        assert c.completion_tokens == m if c.finish_reason == "length" else c.completion_tokens < m
    assert len({m for c, m in zip(together, budgets) if c.finish_reason == "length"}) >= 2
    base = runtime.chat(prompts, None, max_new_tokens=budgets)
    assert together[1].text == base[1].text  # a row without adapter is the base model
    assert together[0].text != base[0].text or together[2].text != base[2].text  # adapters change answers


def test_greedy_rows_stay_greedy_next_to_sampled_rows(runtime):
    greedy = runtime.chat(["green fast"], None, max_new_tokens=6)[0].text
    torch.manual_seed(0)
    mixed = runtime.chat(["green fast"] * 3, None, max_new_tokens=6, temperature=[0.0, 2.0, 2.0])
    assert mixed[0].text == greedy
    assert any(m.text != greedy for m in mixed[1:])  # temperature 2 on a random model wanders


# --- adapters -----------------------------------------------------------------------------

def test_adapter_is_cached_by_description(client):
    first = client.post("/v1/adapters", json={"description": APPLE})
    assert first.status_code == 200, first.text
    generated = _stats(client)["adapters"]["generated"]
    second = client.post("/v1/adapters", json={"description": APPLE})
    other = client.post("/v1/adapters", json={"description": TIGER}).json()
    assert second.json()["id"] == first.json()["id"] and second.json()["cached"] is True
    assert other["id"] != first.json()["id"]
    assert _stats(client)["adapters"]["generated"] == generated + (0 if other["cached"] else 1)
    info = first.json()
    assert info["model"] == f"t2l:{info['id']}" and info["rank"] == 2 and info["target_modules"] == ["q_proj", "v_proj"]
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "base" in models and info["model"] in models


def test_lru_cache_evicts_the_oldest_adapter(runtime):
    with fastapi_testclient.TestClient(create_app(runtime, cache_size=2, batch_window_ms=0)) as c:
        ids = [c.post("/v1/adapters", json={"description": f"answer with the word {w}"}).json()["id"]
               for w in ("apple", "river", "stone")]
        assert c.get(f"/v1/adapters/{ids[0]}").status_code == 404
        assert c.get(f"/v1/adapters/{ids[2]}").status_code == 200
        assert c.get("/v1/stats").json()["adapters"]["evicted"] == 1


def test_adapter_zip_loads_in_peft_with_the_same_logits(client, runtime, world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info = client.post("/v1/adapters", json={"description": TIGER}).json()
    res = client.get(info["download_url"])
    assert res.status_code == 200 and res.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(res.content)).extractall(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "t2l_adapter.json").read_text())["description"] == TIGER
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["llm"]), tmp_path / "adapter").eval()
    ids = torch.tensor([runtime.encode("red blue small")])
    with torch.no_grad(), runtime.injection.use(runtime.adapters([TIGER])):
        ours = runtime.model(ids).logits
    with torch.no_grad():
        theirs = peft(ids).logits
        plain = runtime.model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain, ours, atol=1e-4)


# --- chat ---------------------------------------------------------------------------------

def test_chat_base_adapter_id_and_description_agree_with_the_runtime(client, runtime):
    base = _chat(client, model="base").json()
    assert base["object"] == "chat.completion" and base["model"] == "base"
    assert base["choices"][0]["message"]["content"] == runtime.chat([USER], max_new_tokens=5)[0].text
    by_description = _chat(client, description=APPLE).json()
    adapter = client.post("/v1/adapters", json={"description": APPLE}).json()
    assert by_description["model"] == adapter["model"] and by_description["t2l"]["adapter_id"] == adapter["id"]
    by_id = _chat(client, model=adapter["model"]).json()
    expected = runtime.chat([USER], runtime.adapters([APPLE]), max_new_tokens=5)[0]
    assert by_id["choices"][0]["message"]["content"] == by_description["choices"][0]["message"]["content"] == expected.text
    assert by_id["usage"]["completion_tokens"] == expected.completion_tokens
    assert by_id["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_sends_deltas_then_done(client):
    whole = _chat(client, description=TIGER, max_tokens=6).json()
    with client.stream("POST", "/v1/chat/completions",
                       json={"description": TIGER, "messages": USER, "max_tokens": 6, "stream": True}) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in res.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == whole["model"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) >= 2  # streamed, not one blob
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_concurrent_requests_with_different_adapters_share_one_batch(client, runtime):
    descriptions = [f"answer every input with the word {w} variant 2" for w in ("apple", "river", "stone", "cloud")]
    ids = [client.post("/v1/adapters", json={"description": d}).json()["model"] for d in descriptions]
    before = _stats(client)["batching"]
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        results[i] = _chat(client, model=ids[i], max_tokens=4).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)] + \
              [threading.Thread(target=lambda: results.__setitem__(4, _chat(client, model="base", max_tokens=4).json()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _stats(client)["batching"]
    assert after["requests"] - before["requests"] == 5
    assert after["batches"] - before["batches"] == 1, after
    assert {r["t2l"]["batch_size"] for r in results.values()} == {5}
    weights = runtime.adapters(descriptions)
    for i in range(4):  # every row decoded with its own adapter
        alone = runtime.chat([USER], weights.select(i), max_new_tokens=4)[0].text
        assert results[i]["choices"][0]["message"]["content"] == alone
    assert results[4]["choices"][0]["message"]["content"] == runtime.chat([USER], max_new_tokens=4)[0].text


def test_max_batch_1_serves_one_request_at_a_time(runtime):
    with fastapi_testclient.TestClient(create_app(runtime, max_batch=1, batch_window_ms=250)) as c:
        threads = [threading.Thread(target=_chat, args=(c,), kwargs={"model": "base"}) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = c.get("/v1/stats").json()["batching"]
    assert stats["batches"] == 3 and stats["max_batch_size"] == 1


class SlowRuntime:
    """The real runtime, but every batch takes a second longer (as a big model would)."""

    def __init__(self, runtime):
        self._runtime = runtime

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def chat(self, *args, **kwargs):
        time.sleep(1.0)
        return self._runtime.chat(*args, **kwargs)


def test_event_loop_answers_while_a_batch_decodes(runtime):
    with fastapi_testclient.TestClient(create_app(SlowRuntime(runtime), batch_window_ms=0)) as c:
        done = {}
        worker = threading.Thread(target=lambda: done.setdefault("chat", (_chat(c, model="base"), time.perf_counter())))
        worker.start()
        time.sleep(0.2)  # the batch is now sleeping in the model thread
        health = c.get("/healthz")
        health_at = time.perf_counter()
        worker.join()
    assert health.status_code == 200 and done["chat"][0].status_code == 200
    assert health_at < done["chat"][1] - 0.3, "the event loop was blocked by model work"


# --- bad input ----------------------------------------------------------------------------

BAD_REQUESTS = [
    ("post", "/v1/adapters", {"description": ""}, 422, "description"),
    ("post", "/v1/adapters", {"description": "   "}, 422, "must not be empty"),
    ("post", "/v1/adapters", {"description": "x" * (MAX_DESCRIPTION_CHARS + 1)}, 422, f"at most {MAX_DESCRIPTION_CHARS}"),
    ("post", "/v1/adapters", {}, 422, "description: Field required"),
    ("get", "/v1/adapters/0123456789abcdef", None, 404, "unknown adapter id"),
    ("chat", "", {"model": "base", "max_tokens": 0}, 422, "max_tokens"),
    ("chat", "", {"model": "base", "max_tokens": MAX_TOKENS + 1}, 422, f"less than or equal to {MAX_TOKENS}"),
    ("chat", "", {"model": "base", "temperature": -1}, 422, "temperature"),
    ("chat", "", {"model": "t2l:0123456789abcdef"}, 404, "unknown adapter"),
    ("chat", "", {"model": "gpt-4"}, 404, "unknown model 'gpt-4'"),
    ("chat", "", {"model": "t2l"}, 400, "needs a 'description'"),
    ("chat", "", {"model": "base", "description": APPLE}, 400, "conflicts"),
    ("chat", "", {"description": " "}, 422, "must not be empty"),
    ("chat", "", {"description": "y" * (MAX_DESCRIPTION_CHARS + 1)}, 422, "description"),
    ("chat", "", {"model": "base", "messages": []}, 422, "messages"),
    ("chat", "", {"model": "base", "messages": [{"role": "assistant", "content": "hi"}]}, 422, "role 'user'"),
    ("chat", "", {"model": "base", "messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ("chat", "", {"model": "base", "messages": [{"role": "user", "content": "red " * 300}]}, 400, "context"),
]


@pytest.mark.parametrize("method,path,body,status,words", BAD_REQUESTS,
                         ids=[f"{b[0]}-{b[3]}-{b[4][:24]}" for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_json_error(client, method, path, body, status, words):
    if method == "chat":
        res = _chat(client, **body)
    elif method == "get":
        res = client.get(path)
    else:
        res = client.post(path, json=body)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert words in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")


def test_malformed_json_is_a_400(client):
    for path in ("/v1/adapters", "/v1/chat/completions"):
        res = client.post(path, content=b'{"description": ', headers={"content-type": "application/json"})
        assert res.status_code == 400 and "malformed JSON" in res.json()["error"]["message"]


def test_health_page_and_request_log(client, caplog):
    with caplog.at_level("INFO", logger="t2l.serve"):
        assert client.get("/healthz").json()["status"] == "ok"
    assert any("GET /healthz 200" in r.getMessage() and "ms" in r.getMessage() for r in caplog.records)
    page = client.get("/")
    assert page.status_code == 200 and 'id="description"' in page.text and 'id="prompt"' in page.text


# --- input budgets and hostile input ------------------------------------------------------------

def test_a_body_over_the_limit_is_413_before_parsing(runtime):
    with fastapi_testclient.TestClient(create_app(runtime, max_body_bytes=4096)) as c:
        big = {"model": "base", "messages": [{"role": "user", "content": "red " * 2000}]}  # ~8 kB
        res = c.post("/v1/chat/completions", json=big)
        assert res.status_code == 413 and "larger than 4096 bytes" in res.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"description": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        res = c.post("/v1/adapters", content=chunks(), headers={"content-type": "application/json"})
        assert res.status_code == 413
        assert _chat(c, model="base").status_code == 200  # a small one still works
        assert c.get("/v1/stats").json()["batching"]["requests"] == 1  # the big ones never reached the model


def test_the_default_body_limit_is_about_a_megabyte(client):
    res = client.post("/v1/adapters", content=b"{" + b" " * (1 << 20) + b"}", headers={"content-type": "application/json"})
    assert res.status_code == 413
    assert client.post("/v1/adapters", content=b'{"description": "x"' + b" " * 900_000 + b"}",
                       headers={"content-type": "application/json"}).status_code == 200


def test_message_count_is_limited(client):
    from t2l_framework.serve.schemas import MAX_MESSAGES

    res = _chat(client, model="base", messages=[{"role": "user", "content": ""}] * (MAX_MESSAGES + 1))
    assert res.status_code == 422 and f"at most {MAX_MESSAGES}" in res.json()["error"]["message"]
    parts = [{"type": "text", "text": "red"}] * 65
    assert _chat(client, model="base", messages=[{"role": "user", "content": parts}]).status_code == 422


class SlowTokenizer(SlowRuntime):
    """Tokenising takes a second (a huge prompt on a slow tokenizer)."""

    def chat(self, *args, **kwargs):
        return self._runtime.chat(*args, **kwargs)

    def request_encoder(self):
        encode = self._runtime.request_encoder()

        def slow(*args, **kwargs):
            time.sleep(1.0)
            return encode(*args, **kwargs)

        return slow


def test_healthz_stays_fast_while_a_request_is_tokenised(runtime):
    with fastapi_testclient.TestClient(create_app(SlowTokenizer(runtime), batch_window_ms=0)) as c:
        done = {}
        worker = threading.Thread(target=lambda: done.setdefault("chat", (_chat(c, model="base"), time.perf_counter())))
        worker.start()
        time.sleep(0.2)  # the request is now being tokenised
        t0 = time.perf_counter()
        health = c.get("/healthz")
        latency = time.perf_counter() - t0
        worker.join()
    assert health.status_code == 200 and done["chat"][0].status_code == 200
    assert latency < 0.5, f"/healthz took {latency:.2f} s: tokenising blocked the event loop"


@pytest.mark.parametrize("body, param", [
    ('{"model": "base", "messages": [{"role": "user", "content": "red \\udfff"}]}', "messages.0.content"),
    ('{"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content"),
    ('{"messages": [{"role": "user", "content": "red"}], "description": "apple \\udfff"}', "description"),
])
def test_a_lone_surrogate_is_a_400(client, body, param):
    res = client.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert "not valid Unicode text" in error["message"] and error["param"].startswith(param)
    res = client.post("/v1/adapters", content=b'{"description": "\\udfff task"}', headers={"content-type": "application/json"})
    assert res.status_code == 400 and res.json()["error"]["param"] == "description"


def test_deeply_nested_json_is_a_400(client):
    res = client.post("/v1/adapters", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error"


def test_a_description_past_the_encoder_positions_is_truncated_and_works(client, runtime):
    """The tiny encoder has 64 positions; a description of ~330 tokens used to index past them (500)."""
    long = ("answer every input with the word apple variant 1 " * 40)[:MAX_DESCRIPTION_CHARS].strip()
    assert len(runtime.generator.encoder.tokenizer(long)["input_ids"]) > 64
    res = client.post("/v1/adapters", json={"description": long})
    assert res.status_code == 200, res.text
    assert runtime.generator.encoder.max_length == 64
    # truncated, so it is the adapter of its first 64 tokens: the same as for any text sharing them
    same_start = long + " red"
    assert torch.equal(runtime.adapters([long]).A["q_proj"], runtime.adapters([same_start[:MAX_DESCRIPTION_CHARS]]).A["q_proj"])


def test_a_foreign_host_header_is_refused_when_bound_to_localhost(runtime):
    from t2l_framework.cli import allowed_hosts

    assert allowed_hosts("0.0.0.0") is None  # bound to the network: the operator decides
    app = create_app(runtime, allowed_hosts=allowed_hosts("127.0.0.1"))
    with fastapi_testclient.TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("rebind.attacker.example:8000", "127.0.0.1.attacker.example", "localhost.evil", ""):
            res = c.post("/v1/adapters", json={"description": APPLE}, headers={"host": host})
            assert res.status_code == 400, host
        assert c.get("/v1/stats").json()["adapters"]["generated"] == 0


# --- live server + real browser -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(runtime, world, tmp_path, monkeypatch):
    import uvicorn

    from t2l_framework.assembly.inspect import inspector_for

    monkeypatch.setenv("T2L_CACHE", str(tmp_path / "cache"))
    inspector = inspector_for(runtime.generator, world["run"] / "recipe.yaml")  # familiarity on the page
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime, batch_window_ms=50, inspector=inspector),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _chromium() -> str | None:
    return next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)


def test_web_page_in_headless_chromium(live_server, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("/usr/bin/chromium is absent (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,860", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    service = webdriver.ChromeService(executable_path=driver_path) if Path(driver_path).exists() else None
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(live_server + "/")
        driver.find_element(By.ID, "description").send_keys(APPLE)
        driver.find_element(By.ID, "prompt").send_keys("red blue small")
        driver.find_element(By.ID, "run").click()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "base-time").text and d.find_element(By.ID, "t2l-time").text)
        base = driver.find_element(By.ID, "base-answer").text
        adapted = driver.find_element(By.ID, "t2l-answer").text
        download = driver.find_element(By.ID, "download")
        driver.save_screenshot(str(tmp_path / "t2l_web.png"))
        print(f"screenshot: {tmp_path / 't2l_web.png'}")
        assert base and adapted and base != "…" and adapted != "…"
        for el in ("base-answer", "t2l-answer"):
            assert "error" not in driver.find_element(By.ID, el).get_attribute("class")
        assert driver.find_element(By.ID, "base-time").text.endswith(" s")
        assert download.get_attribute("aria-disabled") == "false" and "/v1/adapters/" in download.get_attribute("href")
        # familiarity next to the answer; a training task's description raises no warning ...
        familiarity = driver.find_element(By.ID, "familiarity").text
        assert "Familiarity:" in familiarity and "th percentile" in familiarity and "toy_0" in familiarity
        assert not driver.find_element(By.ID, "familiarity-warning").is_displayed()
        # ... a description of words the encoder never saw is flagged
        driver.find_element(By.ID, "description").clear()
        driver.find_element(By.ID, "description").send_keys("zzz qqq xxyy")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.ID, "familiarity-warning").is_displayed())
        warning = driver.find_element(By.ID, "familiarity-warning").text
        assert warning.startswith("Unfamiliar description") and "extrapolation" in warning
        assert "unfamiliar" in driver.find_element(By.ID, "familiarity").get_attribute("class")
        driver.save_screenshot(str(tmp_path / "t2l_web_unfamiliar.png"))
    finally:
        driver.quit()
    assert (tmp_path / "t2l_web.png").stat().st_size > 10_000


def test_a_failing_batch_fails_its_requests_with_json_500_and_the_server_goes_on(runtime, caplog):
    class Broken(SlowRuntime):
        def chat(self, *args, **kwargs):
            raise RuntimeError("out of memory at /secret/path")

    with caplog.at_level("INFO", logger="t2l.serve"), \
            fastapi_testclient.TestClient(create_app(Broken(runtime), batch_window_ms=0)) as c:
        res = _chat(c, model="base")
        assert res.status_code == 500 and res.json()["error"]["type"] == "server_error"
        assert "internal server error" in res.json()["error"]["message"] and "/secret" not in res.text
        assert c.get("/healthz").status_code == 200
        assert _chat(c, model="base").status_code == 500  # the batcher is still there to take it
        with c.stream("POST", "/v1/chat/completions", json={"model": "base", "messages": USER, "stream": True}) as s:
            streamed = "".join(s.iter_lines())
        assert "internal server error" in streamed and "/secret" not in streamed
    crashes = [r for r in caplog.records if r.exc_info and "out of memory at /secret/path" in str(r.exc_info[1])]
    assert any(r.getMessage().startswith("internal error in POST /v1/chat/completions") for r in crashes)
    assert any("POST /v1/chat/completions 500" in r.getMessage() for r in caplog.records)


def test_a_t2l_error_from_the_runtime_is_a_400_with_its_message(runtime):
    class Refusing(SlowRuntime):
        def chat(self, *args, **kwargs):
            raise T2LError("this prompt cannot be answered by the runtime")

        def adapters(self, *args, **kwargs):
            raise T2LError("this description cannot be turned into an adapter")

    with fastapi_testclient.TestClient(create_app(Refusing(runtime), batch_window_ms=0)) as c:
        res = _chat(c, model="base")
        assert res.status_code == 400 and res.json()["error"]["message"] == "this prompt cannot be answered by the runtime"
        res = c.post("/v1/adapters", json={"description": APPLE})
        assert res.status_code == 400 and "cannot be turned into an adapter" in res.json()["error"]["message"]
        with c.stream("POST", "/v1/chat/completions", json={"model": "base", "messages": USER, "stream": True}) as s:
            streamed = "".join(s.iter_lines())
        assert "cannot be answered by the runtime" in streamed and "invalid_request_error" in streamed


def test_a_bug_in_a_route_is_a_500_never_a_4xx(runtime, caplog):
    class BrokenExport(SlowRuntime):
        def adapter_writer(self, weights):
            raise KeyError("state that cannot happen")

    with caplog.at_level("ERROR", logger="t2l.serve"), \
            fastapi_testclient.TestClient(create_app(BrokenExport(runtime), batch_window_ms=0)) as c:
        made = c.post("/v1/adapters", json={"description": APPLE})
        assert made.status_code == 200
        res = c.get(made.json()["download_url"])
    assert res.status_code == 500 and "cannot happen" not in res.text
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)


def test_t2l_serve_command_binds_loopback_and_answers(world):
    import httpx

    from t2l_framework.cli import build_parser

    assert build_parser().parse_args(["serve", "RUN"]).host == "127.0.0.1"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "t2l_framework.cli", "serve", str(world["run"]), "--port", str(port),
                             "--max-batch", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "t2l serve did not come up"
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        res = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                         json={"description": APPLE, "messages": USER, "max_tokens": 3})
        assert res.status_code == 200 and res.json()["model"].startswith("t2l:")
        rebound = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"host": f"attacker.example:{port}"})
        assert rebound.status_code == 400  # DNS rebinding: a foreign name resolving to 127.0.0.1
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "POST /v1/chat/completions 200" in out and "batches of up to 4" in out


def test_concurrent_posts_of_one_description_generate_it_once(client):
    description = "answer every input with the word cloud variant 5"
    before = _stats(client)["adapters"]["generated"]
    out = []
    threads = [threading.Thread(target=lambda: out.append(client.post("/v1/adapters", json={"description": description})))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in out] == [200] * 3 and len({r.json()["id"] for r in out}) == 1
    assert _stats(client)["adapters"]["generated"] == before + 1
