"""A resumable, world-size independent sampler over packed blocks.

The global sample sequence is position p = 0, 1, 2, ...: epoch e = p // E (E = the epoch length
rounded down to whole global batches), sample = randperm_{seed, e}(N)[p % E]. An optimizer step takes
the next `global_batch` positions; within it, micro-step k of rank r takes positions
k * (W * micro) + r * micro + [0, micro). So the state is just p (samples consumed), resuming costs
O(1), and 1 rank with 2 accumulation steps sees the same global batch as 2 ranks with 1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class GlobalOrderSampler:
    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        start: int = 0,
    ):
        if global_batch % (micro_batch * world_size):
            raise ValueError(
                f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                f"world size {world_size}"
            )
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} blocks, fewer than one global batch ({global_batch})"
            )
        self.n, self.gb, self.mb, self.w, self.r, self.seed = (
            num_samples,
            global_batch,
            micro_batch,
            world_size,
            rank,
            seed,
        )
        self.epoch_len = (num_samples // global_batch) * global_batch
        self.start = start
        self._perm_epoch, self._perm = -1, None

    def _index(self, p: int) -> int:
        e = p // self.epoch_len
        if e != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), e
        return int(self._perm[p % self.epoch_len])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Micro-batches of (global position, sample index) for this rank, forever."""
        p = self.start - self.start % self.gb  # steps are atomic: resume at a step boundary
        per_step = self.gb // (self.mb * self.w)
        while True:
            for k in range(per_step):
                base = p + k * self.mb * self.w + self.r * self.mb
                yield [(q, self._index(q)) for q in range(base, base + self.mb)]
            p += self.gb
