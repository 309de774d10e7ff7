"""The batch window: a burst of requests lands in one batch; the window has a cap."""

from __future__ import annotations

import asyncio

from t2l_framework.serve.batching import MAX_WAIT_WINDOWS, Batcher, Job


async def _collect_burst(window_s: float, gap_s: float, n: int) -> tuple[list[Job], float]:
    """Send ``n`` jobs ``gap_s`` apart; return the first batch ``_collect`` closes and its age."""
    batcher = Batcher(runtime=None, max_batch=64, window_s=window_s)
    batcher.queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def send():
        for _ in range(n):
            batcher.queue.put_nowait(Job([1], None, 4, 0.0, loop.create_future()))
            await asyncio.sleep(gap_s)

    sender = asyncio.create_task(send())
    t0 = loop.time()
    jobs = await batcher._collect()
    age = loop.time() - t0
    sender.cancel()
    batcher.executor.shutdown(wait=False)
    return jobs, age


def test_a_burst_longer_than_one_window_is_one_batch():
    # 7 requests 50 ms apart span 300 ms, more than the 200 ms window: each arrival extends it
    # (a window counted from the first request alone would close after 4 of them).
    jobs, _ = asyncio.run(_collect_burst(window_s=0.2, gap_s=0.05, n=7))
    assert len(jobs) == 7


def test_a_steady_stream_is_cut_at_the_cap():
    # Requests every 20 ms forever: the window keeps moving, so the cap must close the batch.
    jobs, age = asyncio.run(_collect_burst(window_s=0.05, gap_s=0.02, n=1000))
    assert 3 < len(jobs) < 1000
    assert age < MAX_WAIT_WINDOWS * 0.05 + 0.5  # closed near the cap (slack for a busy machine)
