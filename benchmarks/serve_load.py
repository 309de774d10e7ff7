"""Load test of `t2l serve`: concurrent chat requests with distinct adapters, batched vs one at a time.

Starts `t2l serve RUN` twice on loopback (``--max-batch N``, then ``--max-batch 1``), creates
the adapters for ``--descriptions`` task descriptions, then sends ``--requests`` concurrent
greedy chat requests (request i uses adapter i mod D) and reports p50 / p95 latency and
throughput. Baseline: the same requests served one at a time by the same server code.
Target: batched throughput >= 3x sequential. No request may be dropped.

``--model PATH`` serves another base model (a local folder, e.g. a random-weight stand-in) through
the same app: the run's hypernetwork cannot fit another base, so an untrained one of the run's
settings is built for it (serving cost does not depend on trained weights; answers are then noise).

    python benchmarks/serve_load.py [RUN] [--requests 32] [--descriptions 8] [--max-tokens 32] [--max-batch 32] [--dtype auto] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from _common import DEMO_MODEL, add_model_args, check_model

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0
DESCRIPTIONS = [
    "Classify the sentiment of a movie review as positive or negative.",
    "Translate the given English sentence into French.",
    "Answer the question with a single word: yes or no.",
    "Extract the name of the person mentioned in the sentence.",
    "Summarise the given text in one short sentence.",
    "Decide whether the two sentences mean the same thing; answer True or False.",
    "Give the topic of the news headline: sports, business, politics or science.",
    "Correct the grammar of the given sentence.",
]
PROMPTS = [
    "The film was long, but the ending made it worth it.",
    "I would like a cup of coffee, please.",
    "Is the sky blue on a clear day?",
    "Yesterday Maria Lopez opened a bakery on Main Street.",
    "The city council met on Tuesday to discuss the new park, and agreed to fund it next year.",
    "A man is playing a guitar. / Someone plays an instrument.",
    "Stocks rally as inflation cools faster than expected",
    "She don't like going to school on mondays.",
]


def serve_standin(args) -> None:
    """Serve ``--model`` with an untrained hypernetwork of the run's settings (same app as `t2l serve`)."""
    import uvicorn
    from omegaconf import OmegaConf

    from _common import load_model
    from t2l_framework.assembly import build_encoder, load_recipe
    from t2l_framework.hypernet import HyperNetwork
    from t2l_framework.runtime import AdapterGenerator
    from t2l_framework.serve import create_app

    cfg = load_recipe(str(Path(args.run) / "recipe.yaml"))
    runtime = load_model(args, list(cfg.lora.target_modules))
    encoder = build_encoder(cfg.encoder)
    net = HyperNetwork(runtime.injection.shapes, encoder.dim, OmegaConf.to_object(cfg.hypernet),
                       OmegaConf.to_object(cfg.lora), base_model=args.model).eval().to(runtime.device)
    runtime.generator = AdapterGenerator(net, encoder, identity="standin", name="untrained stand-in",
                                         base_config=None)
    runtime.identity, runtime.name = "standin", "untrained stand-in"
    app = create_app(runtime, max_batch=args.max_batch, batch_window_ms=args.window_ms)
    uvicorn.run(app, host="127.0.0.1", port=args.serve_standin, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, max_batch: int, window_ms: float, dtype: str, model: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "t2l_framework.cli", "serve", run, "--port", str(port),
           "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--dtype", dtype]
    if model != DEMO_MODEL:  # this script again, as a server of the stand-in (see serve_standin)
        cmd = [sys.executable, __file__, run, "--serve-standin", str(port), "--max-batch", str(max_batch),
               "--window-ms", str(window_ms), "--dtype", dtype, "--model", model]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout:.0f} s")


async def load(url: str, n_requests: int, n_desc: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=n_requests + 8, max_keepalive_connections=n_requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        models = []
        for desc in DESCRIPTIONS[:n_desc]:  # adapters are made once, before the clock starts
            res = await client.post("/v1/adapters", json={"description": desc})
            res.raise_for_status()
            models.append(res.json()["model"])
        await client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "Hello"}]})
        before = (await client.get("/v1/stats")).json()["batching"]

        async def one(i: int) -> tuple[float, dict | None]:
            body = {"model": models[i % n_desc], "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[(i // n_desc + i) % len(PROMPTS)]}]}
            t0 = time.perf_counter()
            try:
                res = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                return time.perf_counter() - t0, None
            return time.perf_counter() - t0, res.json() if res.status_code == 200 else None

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n_requests)))
        wall = time.perf_counter() - t0
        after = (await client.get("/v1/stats")).json()["batching"]
    ok = [r for _, r in results if r is not None]
    latencies = sorted(t for t, _ in results)
    batches = after["batches"] - before["batches"]
    return {"wall": wall, "ok": len(ok), "latencies": latencies,
            "tokens": sum(r["usage"]["completion_tokens"] for r in ok),
            "answers": [r["choices"][0]["message"]["content"] if r else None for _, r in results],
            "mean_batch": (after["requests"] - before["requests"]) / batches if batches else 0.0,
            "batches": batches, "largest_batch": after["max_batch_size"]}


def measure(run: str, max_batch: int, window_ms: float, args) -> dict:
    port = free_port()
    proc = start_server(run, port, max_batch, window_ms, args.dtype, args.model)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        return asyncio.run(load(f"http://127.0.0.1:{port}", args.requests, args.descriptions, args.max_tokens))
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(ROOT / "runs" / "smollm2_demo"),
                        help="run folder (default runs/smollm2_demo)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--descriptions", type=int, default=8, choices=range(1, len(DESCRIPTIONS) + 1))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32, help="batch size of the batched server")
    parser.add_argument("--window-ms", type=float, default=30.0)
    add_model_args(parser)
    parser.add_argument("--serve-standin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_standin:
        return serve_standin(args)
    check_model(args)

    rows = {}
    for name, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
        print(f"[serve_load] {name}: starting `t2l serve {args.run} --max-batch {max_batch}` ...", file=sys.stderr)
        rows[name] = measure(args.run, max_batch, args.window_ms, args)

    print(f"\n{args.requests} concurrent chat requests, {args.descriptions} distinct adapters, "
          f"max_tokens {args.max_tokens}, greedy, dtype {args.dtype}, loopback ({args.run}, base {args.model})")
    print(f"{'mode':<15} {'ok':>6} {'p50 s':>8} {'p95 s':>8} {'wall s':>8} {'req/s':>7} {'tok/s':>7} {'mean batch':>11} {'batches':>8} {'largest':>8}")
    for name, r in rows.items():
        lat = r["latencies"]
        print(f"{name:<15} {r['ok']:>3}/{args.requests:<2} {statistics.median(lat):>8.2f} {pct(lat, 0.95):>8.2f} "
              f"{r['wall']:>8.2f} {r['ok'] / r['wall']:>7.2f} {r['tokens'] / r['wall']:>7.1f} {r['mean_batch']:>11.1f} {r['batches']:>8} {r['largest_batch']:>8}")
    batched, seq = rows["batched"], rows["one at a time"]
    ratio = (batched["ok"] / batched["wall"]) / (seq["ok"] / seq["wall"])
    same = sum(a == b for a, b in zip(batched["answers"], seq["answers"]))
    dropped = 2 * args.requests - batched["ok"] - seq["ok"]
    print(f"\nthroughput batched / one at a time: {ratio:.2f}x (target >= {TARGET_RATIO:.0f}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}); dropped requests: {dropped}; "
          f"identical answers in both modes: {same}/{args.requests}")
    sys.exit(1 if dropped else 0)


if __name__ == "__main__":
    main()
