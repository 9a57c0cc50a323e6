"""Which sample every rank sees at every step: the global order of an epoch, its split across ranks, and resume.

The loader decides the order itself rather than leaving it to a reader's sharding, because it must be exact:
- Epoch e's order is a permutation of all N samples seeded by (seed, e) (the identity when not shuffling).
- It is cut into global batches of G = world_size * local_batch; the last one is padded by wrapping around to the
  start of the order, so every rank runs exactly ceil(N / G) steps whatever the shard sizes, and no rank ever waits.
- Global batch s covers the order's positions [s*G, (s+1)*G); rank r takes the r-th contiguous slice of B samples.
  Ranks are therefore disjoint, and together they see every sample once per epoch (plus the padding).
- The position of the next batch (samples consumed globally) means the same thing for any world size: a run resumed
  at position p continues with the order's positions [p, N), split among however many ranks it now has.
"""

from __future__ import annotations

import numpy as np


class SampleOrder:
    def __init__(self, num_samples: int, local_batch: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("the split holds no samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.num_samples, self.local_batch, self.rank, self.world_size = num_samples, local_batch, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_from(0)

    def steps_from(self, position: int) -> int:
        """Steps left in an epoch whose next batch starts at `position`."""
        return -(-(self.num_samples - position) // self.global_batch)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._cached = (epoch, order)
        return self._cached[1]

    def batch(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's samples (indices into the split) of the global batch starting at `position`, and whether each
        is real (False: padding that repeats a sample from the start of the epoch's order)."""
        positions = position + self.rank * self.local_batch + np.arange(self.local_batch)
        return self.permutation(epoch)[positions % self.num_samples], positions < self.num_samples

    def locate(self, start_epoch: int, start_position: int, iteration: int) -> tuple[int, int]:
        """(epoch, position) of the `iteration`-th batch of a stream that started at (start_epoch, start_position) and
        runs through the following epochs without a break."""
        first = self.steps_from(start_position)
        if iteration < first:
            return start_epoch, start_position + iteration * self.global_batch
        later = iteration - first
        return start_epoch + 1 + later // self.steps_per_epoch, (later % self.steps_per_epoch) * self.global_batch
