"""The training stream dealt out to ranks: one stream of batches, each rank its own slice.

Batch i of the stream is a pure function of (seed, i). With W ranks, a run of ``n`` micro-batches
per rank reads the first ``n x W`` batches: micro-batch m of rank r is batch ``m x W + r``, so
the W batches of one micro-batch position are consecutive, every batch is read once, and a
single process with W times the accumulation reads the same batches into each optimizer step.

A resume continues at micro-batch ``global_step x accumulation`` on every rank. That is exact
only at the world size the checkpoint was written with (the stream's length and the
ranks' noise seeds depend on it), so the world size travels in the checkpoint
(``ResumableStream.state_dict``) and a resume at another one is refused with one line.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler

from t2l_framework.errors import T2LError


class StreamSampler(DistributedSampler):
    """Rank ``rank`` of ``world_size``: stream indices ``m x world_size + rank``, m = start ... stop-1.

    A ``DistributedSampler`` so that Lightning leaves it in place instead of dealing its indices
    out again. ``len`` is ``stop``, the micro-batches of the *whole* run on one rank: Lightning
    restores how many batches of the epoch were done and stops the epoch when that count
    reaches ``len``, so counting only the remaining ones would end a resumed epoch early.
    """

    def __init__(self, start: int, stop: int, rank: int = 0, world_size: int = 1):
        super().__init__(range(stop * world_size), num_replicas=world_size, rank=rank, shuffle=False)
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start * self.num_replicas + self.rank, self.stop * self.num_replicas,
                          self.num_replicas))

    def __len__(self) -> int:
        return self.stop


def trainer_share(trainer) -> tuple[int, int, int]:
    """(first micro-batch to draw, rank, world size) for ``trainer`` (None: a fresh single process)."""
    if trainer is None:
        return 0, 0, 1
    start = int(trainer.global_step) * int(trainer.accumulate_grad_batches)
    return start, int(getattr(trainer, "global_rank", 0) or 0), int(getattr(trainer, "world_size", 1) or 1)


class ResumableStream:
    """Mixin for a LightningDataModule whose training loader is a ``StreamSampler``: records the
    world size in every checkpoint and refuses a resume at another one.

    Checkpoints written before the world size was recorded carry an empty state; they are taken
    as single-process runs (the only world size at which their stream was right)."""

    def stream_sampler(self, micro_batches: int) -> StreamSampler:
        start, rank, world = trainer_share(getattr(self, "trainer", None))
        return StreamSampler(start, micro_batches, rank, world)

    def _world_size(self) -> int:
        return trainer_share(getattr(self, "trainer", None))[2]

    def state_dict(self) -> dict:
        return {"world_size": self._world_size()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved, now = int(state_dict.get("world_size", 1)), self._world_size()
        if saved != now:
            raise T2LError(f"--resume: the checkpoint was written by a run on {saved} process(es) and this run has "
                           f"{now} (trainer.devices x trainer.num_nodes): the data stream and the noise seeds are "
                           f"only exact at the same world size; resume with {saved}, or start again with --overwrite")
