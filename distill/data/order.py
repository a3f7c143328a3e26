"""A deterministic batch order that any step of any rank can be computed from (exact resume)."""

from __future__ import annotations

import torch


class BatchOrder:
    """Which blocks form each micro-batch, as a pure function of (step, micro-step, rank).

    Blocks are visited in a fresh seeded permutation each epoch. The optimizer step `s` consumes
    the global positions [s*G, (s+1)*G) with G = batch_size * grad_accum * world_size; rank r's
    micro-batch a takes a contiguous slice of them. The set of blocks an optimizer step sees
    depends only on G, so 1 process with grad_accum=2 sees what 2 processes with 1 see, and a
    resumed run needs nothing but the step number to continue the exact order.
    """

    def __init__(
        self, num_blocks: int, batch_size: int, grad_accum: int, world_size: int, seed: int
    ):
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            if len(self._perms) > 1:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.num_blocks, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> torch.Tensor:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.batch_size
        positions = range(start, start + self.batch_size)
        return torch.stack(
            [self._perm(p // self.num_blocks)[p % self.num_blocks] for p in positions]
        )

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_blocks
