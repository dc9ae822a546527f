"""The order in which training and validation examples are drawn: a function of (seed, step), so resume is exact."""

from __future__ import annotations

import torch

from surgeon.errors import SurgeonError
from surgeon.seeding import generator


class BatchSampler:
    """Global batch ``step`` = positions [step·B, (step+1)·B) of an endless stream of per-epoch permutations."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n == 0:
            raise SurgeonError("the training data is empty", "point --data at a folder with images, or use kanjivg")
        if batch_size > n:  # a batch repeats examples, and a huge one builds a list of its indices for minutes
            raise SurgeonError(
                f"batch size {batch_size} is larger than the {n} training examples",
                f"use --batch-size {n} or less, or train on more data",
            )
        if batch_size % world:
            raise SurgeonError(f"batch size {batch_size} is not divisible by {world} processes", "pick a multiple")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=generator(self.seed, epoch))
        return self._perm

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(pos // self.n)[pos % self.n]))
        return out[self.rank :: self.world]
