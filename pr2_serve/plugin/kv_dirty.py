"""Which KV-cache blocks hold anything, so that zeroing the cache after a weight update costs
what was written since the last zeroing, not the whole cache.

After every reload the engine zeroes the KV cache (weights that made NaN/Inf leave them in KV
slots, and attention reads stale slots of a reused block: masked, but NaN x 0 is NaN). A
:class:`DirtyBlocks` records the slots each step wrote (the step's ``slot_mapping``) as block
ids; :meth:`DirtyBlocks.zero` zeroes only those blocks in every layer's cache. It zeroes
everything instead when it cannot vouch for the record: before the first zeroing (the cache's
initial contents), after a step that failed part-way, or when a cache tensor is not laid out
``[num_blocks, block_size, ...]`` or ``[num_blocks, heads, block_size, ...]`` with the sizes
it was told (any other backend).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DirtyBlocks"]


class DirtyBlocks:
    """Blocks written since the last :meth:`zero` (see module docstring)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks: set[int] | None = None  # None: unknown, zero everything

    def note(self, slots: np.ndarray) -> None:
        """Record the KV slots a step wrote (negative: padding)."""
        if self.blocks is not None and len(slots):
            slots = np.asarray(slots)
            blocks = np.unique(slots[slots >= 0] // self.block_size)
            if len(blocks) and blocks[-1] >= self.num_blocks:
                self.blocks = None  # slots outside the layout we were told: zero everything
            else:
                self.blocks.update(blocks.tolist())

    def forget(self) -> None:
        """A step failed part-way: the record cannot be trusted until the next full zeroing."""
        self.blocks = None

    def zero(self, caches: list[torch.Tensor]) -> int:
        """Zero the recorded blocks of every cache tensor (all of it when unsure); return how
        many blocks per layer were zeroed."""
        blocks = self.blocks
        if blocks is not None and all(self._block_major(t) for t in caches):
            index = torch.tensor(sorted(blocks), dtype=torch.long)
            for t in caches:
                t.index_fill_(0, index, 0)
            zeroed = len(blocks)
        else:
            for t in caches:
                t.zero_()
            zeroed = max((t.shape[0] for t in caches), default=0)
        self.blocks = set()
        return zeroed

    def _block_major(self, t: torch.Tensor) -> bool:
        """``t`` is ``[num_blocks, block_size, ...]`` or ``[num_blocks, heads, block_size,
        ...]`` (the CPU backend's)."""
        return (
            t.dim() >= 3
            and t.shape[0] == self.num_blocks
            and self.block_size in (t.shape[1], t.shape[2])
        )
