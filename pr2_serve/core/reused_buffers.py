"""Byte buffers given out again once nothing else holds them: two serve a whole weight update.

A receiver (a gloo transfer, a streamed upload) fills a buffer and hands views of it to the live
update (the buffer itself stays here: it is in use while a view of it is alive). On the CPU the
update copies each tensor into the model as it loads, so once a bucket is applied no view of its
buffer is left, and the next-but-one bucket can be received into it: no new memory is touched
per bucket. A layer that keeps views of its tensors until it is whole keeps its buffer, and a
new one is made; buffers on a GPU are never given out again (the copies out of them may still be
queued). Pure torch.

On the CPU each buffer is a mapping of its own (anonymous, private), not a block of the heap:
once nothing holds it, its memory goes back to the system at once, where a freed heap block
stays resident in the allocator and counts in the server's RSS until the allocator trims it
(measured at 1.07 GB: a transfer's buffers, freed after its last bucket, still counted when the
update peaked; an upload's buckets, each allocated anew, left more resident than two buckets).
The last bucket is taken with ``last=True``: the buffers not in use are let go then, and the
others once nothing holds them, so at the end of an update only the last bucket remains
(``benchmarks/weights.py`` measures the peak against the bound: the undo + 2 buckets).

Not used for a load from files, which reads each tensor into a buffer of its own: read into
reused bucket buffers, a 1.07 GB load peaked 30-50 MiB higher and applied slower in one run of
``benchmarks/weights.py`` (a kept view pins a whole bucket there, where it pins only its own
tensor otherwise).
"""

from __future__ import annotations

import mmap

import torch

__all__ = ["ReusedBuffers", "held_only_here", "mapped_bytes", "storage_holders"]


class ReusedBuffers:
    """Buffers of ``uint8`` on ``device`` (see module docstring); at most ``keep`` wait.

    A buffer is in use while a view of it is alive: hand views of it on (``base[:n]``), never
    the buffer itself, and it comes back by itself, at the next :meth:`take`, once the last of
    them is gone."""

    def __init__(self, device="cpu", keep: int = 2) -> None:
        self.device, self.keep = torch.device(device), keep
        self.free: list[torch.Tensor] = []
        self.lent: list[torch.Tensor] = []

    def take(self, nbytes: int, last: bool = False) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes; ``last``: no other will be taken, so none is
        kept from now on (the ones in use are let go when their views are)."""
        back = [b for b in self.lent if held_only_here(b)]
        self.lent = [b for b in self.lent if all(b is not x for x in back)]
        kept = sorted([*self.free, *back], key=torch.Tensor.numel)
        self.free = kept[len(kept) - self.keep :]  # the largest
        fits = [i for i, base in enumerate(self.free) if base.numel() >= nbytes]
        base = self.free.pop(fits[0]) if fits else self._new(nbytes)
        if last:
            self.keep, self.free, self.lent = 0, [], []
        elif self.device.type == "cpu":  # on a GPU the copies out of it may still be queued
            self.lent.append(base)
        return base

    def _new(self, nbytes: int) -> torch.Tensor:
        if self.device.type != "cpu" or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return mapped_bytes(nbytes)


def mapped_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` (> 0) of zeroed CPU memory in a private anonymous mapping of their own,
    unmapped when the last tensor over it is gone."""
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(area, dtype=torch.uint8)  # the tensor keeps the mapping alive


def held_only_here(base: torch.Tensor) -> bool:
    """Nothing but ``base`` itself holds its memory (no view of it is alive anywhere)."""
    holders = storage_holders(base.untyped_storage())  # the tensor + the storage object asked
    return holders is not None and holders <= 2


def storage_holders(storage: torch.UntypedStorage) -> int | None:
    """How many tensors and storage objects (``storage`` itself included) hold its memory;
    None on a torch that cannot say (then never give it out again rather than guess)."""
    try:
        return torch._C._storage_Use_Count(storage._cdata)
    except AttributeError:
        return None
