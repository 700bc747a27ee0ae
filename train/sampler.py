"""Deterministic, resumable batch order.

The order of epoch ``e`` is a permutation seeded by ``(seed, e)``; a position is just
``(epoch, batches consumed in it)``, so a resumed run continues with exactly the batches the
uninterrupted run would have seen. With several processes each rank takes every ``world``-th batch.
"""

from __future__ import annotations

import numpy as np


class ResumableBatches:
    """Infinite iterator of index lists; ``position`` can be saved and handed back to resume."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 position: tuple[int, int] = (0, 0)):
        if n < 1:
            raise ValueError("no samples to batch")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.consumed = position

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)]
        usable = len(batches) - len(batches) % self.world if len(batches) >= self.world else len(batches)
        return batches[:usable][self.rank::self.world] if self.world > 1 else batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.consumed

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        batches = self._epoch_batches(self.epoch)
        if self.consumed >= len(batches):
            self.epoch, self.consumed = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        batch = batches[self.consumed]
        self.consumed += 1
        return batch
