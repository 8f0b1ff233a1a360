"""A resumable, world-size independent sampler over packed blocks.

The global sample sequence is position p = 0, 1, 2, ...; `BlockOrder` maps p to a block, as a pure
function of (seed, p) and the config. One dataset at one length: epoch e = p // E (E = the epoch length
rounded down to whole global batches), sample = randperm_{seed, e}(N)[p % E]. An optimizer step takes
the next `global_batch` positions; within it, micro-step k of rank r takes positions
k * (W * micro) + r * micro + [0, micro). So the state is just p (samples consumed), resuming costs
O(1), and 1 rank with 2 accumulation steps sees the same global batch as 2 ranks with 1.

Sequence-length warmup (`data.seq_len_schedule`) and mixtures (`data.dataset: {folder: weight}`, see
data/mixture.py) only change the map: step = p // global_batch picks the phase (its block length),
u = p - (the phase's first step) x global_batch is the position inside the phase, a mixture turns u
into (dataset k, that dataset's own position q), and each (dataset, length) view has its own epochs
of random permutations. A global batch is `global_batch` samples at every length.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

import numpy as np
import torch

from roberta_ds.config import Schedule


def seq_len_at(schedule: list[list[int]] | None, step: int, default: int) -> int:
    """The block length of optimizer step `step` under [[first_step, seq_len], ...] (first_step 0 first)."""
    return Schedule(schedule).value_at(step) if schedule else default


class EpochPermutation:
    """q -> randperm_e(n)[q % epoch_len], e = q // epoch_len; one permutation cached at a time."""

    def __init__(self, n: int, epoch_len: int, seed: int, key: tuple[int, ...] = ()):
        self.n, self.epoch_len, self.seed, self.key = n, epoch_len, seed, key
        self._epoch, self._perm = -1, None

    def _generator_seed(self, e: int) -> int:
        if not self.key:  # one dataset at its prepared length: the stream of earlier versions
            return self.seed * 1_000_003 + e
        entropy = [self.seed, e, *self.key]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))

    def __call__(self, q: int) -> int:
        e = q // self.epoch_len
        if e != self._epoch:
            g = torch.Generator().manual_seed(self._generator_seed(e))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), e
        return int(self._perm[q % self.epoch_len])


class BlockOrder:
    """Global position -> index into a catalog of views (dataset k, block length L), laid out in
    the order of `sizes` ({(k, L): number of blocks}).

    schedule: [[first_step, L], ...]; mix: u -> (k, q) for several datasets (data/mixture.py), None
    for one. One dataset keeps epochs of whole global batches; in a mixture each view's epoch is
    its own length (its blocks come round at the mixture's rate, not in step with the batches).
    """

    def __init__(
        self,
        sizes: dict[tuple[int, int], int],
        schedule: list[list[int]],
        global_batch: int,
        seed: int,
        native_len: int,
        mix: Callable[[int], tuple[int, int]] | None = None,
    ):
        self.gb, self.schedule, self.mix = global_batch, schedule, mix
        self.starts = [s for s, _ in schedule]
        self.offsets, self.perms, offset = {}, {}, 0
        for (k, L), n in sizes.items():
            self.offsets[(k, L)] = offset
            offset += n
            epoch_len = n if mix else (n // global_batch) * global_batch
            key = () if (k, L) == (0, native_len) else (k, L)
            self.perms[(k, L)] = EpochPermutation(n, epoch_len, seed, key)
        self.num_samples = offset

    @classmethod
    def single(cls, num_samples: int, global_batch: int, seed: int) -> BlockOrder:
        return cls({(0, 0): num_samples}, [[0, 0]], global_batch, seed, native_len=0)

    def __call__(self, p: int) -> int:
        phase = bisect.bisect_right(self.starts, p // self.gb) - 1
        start, L = self.schedule[phase]
        u = p - start * self.gb
        k, q = self.mix(u) if self.mix else (0, u)
        return self.offsets[(k, L)] + self.perms[(k, L)](q)


class GlobalOrderSampler:
    """Micro-batches of (global position, catalog index) for one rank. `order` maps positions to
    indices (default: one dataset of `num_samples` blocks, shuffled per (seed, epoch))."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        start: int = 0,
        order: BlockOrder | None = None,
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
        self.gb, self.mb, self.w, self.r = global_batch, micro_batch, world_size, rank
        self.order = order or BlockOrder.single(num_samples, global_batch, seed)
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Micro-batches of (global position, sample index) for this rank, forever."""
        p = self.start - self.start % self.gb  # steps are atomic: resume at a step boundary
        per_step = self.gb // (self.mb * self.w)
        while True:
            for k in range(per_step):
                base = p + k * self.mb * self.w + self.r * self.mb
                yield [(q, self.order(q)) for q in range(base, base + self.mb)]
            p += self.gb
