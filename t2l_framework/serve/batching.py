"""Windowed batching: concurrent chat requests, each with its own adapter, share one generate.

The first request of a batch opens a window of ``window_s``, and every request that joins it
extends the window by ``window_s`` from its arrival, up to ``MAX_WAIT_WINDOWS`` windows after
the first: a burst of requests (tokenised one after another) lands in one batch instead of
being cut after the first few. Up to ``max_batch`` requests are decoded together through the
per-sample LoRA. All
model work runs in one worker thread, so the event loop keeps accepting requests (and
filling the next batch) while a batch decodes. ``max_batch=1`` serves requests one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from t2l_framework.runtime.loaded import Completion
from t2l_framework.lora.weights import LoraWeights

log = logging.getLogger("t2l.serve")

MAX_WAIT_WINDOWS = 4  # a batch waits at most this many windows after its first request


@dataclass
class Job:
    """One chat request waiting for a batch."""

    ids: list[int]
    weights: LoraWeights | None
    max_tokens: int
    temperature: float
    future: asyncio.Future
    on_text: Callable[[str], None] | None = None  # called from the worker thread
    batch_size: int = 0


@dataclass
class BatchStats:
    """What the batcher has done: how many batches of which sizes."""

    batches: int = 0
    requests: int = 0
    max_batch_size: int = 0
    sizes: Counter = field(default_factory=Counter)
    busy_s: float = 0.0

    def record(self, n: int, seconds: float) -> None:
        self.batches += 1
        self.requests += n
        self.max_batch_size = max(self.max_batch_size, n)
        self.sizes[n] += 1
        self.busy_s += seconds

    def as_dict(self) -> dict:
        return {"batches": self.batches, "requests": self.requests, "max_batch_size": self.max_batch_size,
                "mean_batch_size": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "model_busy_s": round(self.busy_s, 3)}


class Batcher:
    """Collects a burst of jobs (``window_s`` after the last arrival, at most ``MAX_WAIT_WINDOWS``
    windows, at most ``max_batch`` jobs) and runs them as one batch."""

    def __init__(self, runtime, max_batch: int = 16, window_s: float = 0.03):
        self.runtime = runtime
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, float(window_s))
        self.stats = BatchStats()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2l-model")
        self.queue: asyncio.Queue[Job] | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop(), name="t2l-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def run_model(self, fn: Callable, *args) -> Any:
        """Run other model work (adapter generation) on the same worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def generate(self, ids: list[int], weights: LoraWeights | None, max_tokens: int, temperature: float,
                       on_text: Callable[[str], None] | None = None) -> tuple[Completion, int]:
        """Queue one request; returns its completion and the size of the batch it ran in."""
        job = Job(ids, weights, max_tokens, temperature, asyncio.get_running_loop().create_future(), on_text)
        await self.queue.put(job)
        completion = await job.future
        return completion, job.batch_size

    async def _collect(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = [await self.queue.get()]
        opened = loop.time()
        deadline = opened + self.window_s  # moves with each arrival, never past the cap
        cap = opened + MAX_WAIT_WINDOWS * self.window_s
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self.queue.get_nowait())  # already waiting: no need to wait for the window
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
            deadline = min(cap, loop.time() + self.window_s)
        return jobs

    async def _loop(self) -> None:
        while True:
            jobs = [j for j in await self._collect() if not j.future.done()]  # drop cancelled requests
            if not jobs:
                continue
            t0 = time.perf_counter()
            try:
                results = await self.run_model(self._run, jobs)
            except Exception as exc:  # noqa: BLE001 - the batch fails, the server does not
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - t0
            self.stats.record(len(jobs), seconds)
            log.info("batch of %d decoded in %.0f ms", len(jobs), seconds * 1000)
            for job, result in zip(jobs, results):
                job.batch_size = len(jobs)
                if not job.future.done():
                    job.future.set_result(result)

    def _run(self, jobs: list[Job]) -> list[Completion]:
        streaming = [j.on_text for j in jobs]
        on_text = (lambda row, text: streaming[row] and streaming[row](text)) if any(streaming) else None
        return self.runtime.chat([j.ids for j in jobs], [j.weights for j in jobs],
                                 max_new_tokens=[j.max_tokens for j in jobs],
                                 temperature=[j.temperature for j in jobs], on_text=on_text)
