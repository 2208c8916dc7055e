"""Byte buffers given out again once nothing else holds them: two serve a whole weight update.

A receive (a gloo transfer's buckets) fills a buffer and hands views of it to the live update.
On the CPU the update copies each tensor into the model as it loads, so once a bucket is
applied no view of its buffer is left, and the next-but-one bucket can be received into it: no
new memory is touched per bucket (a fresh buffer's pages are faulted in and zeroed, and a freed
one stays in the allocator's free lists). A layer that keeps views of its tensors until it is
whole keeps its buffer, and a new one is made; buffers on a GPU are never given out again (the
copies out of them may still be queued). Pure torch. Not used for a load from files, which
reads each tensor into a buffer of its own: read into reused bucket buffers, a 1.07 GB load
peaked 30-50 MiB higher and applied slower in one run of ``benchmarks/weights.py`` (a kept
view pins a whole bucket there, where it pins only its own tensor otherwise).
"""

from __future__ import annotations

import torch

__all__ = ["ReusedBuffers", "held_only_here"]


class ReusedBuffers:
    """Buffers of ``uint8`` on ``device`` (see module docstring); at most ``keep`` wait."""

    def __init__(self, device="cpu", keep: int = 2) -> None:
        self.device, self.keep, self.free = torch.device(device), keep, []

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes (slice it: ``base[:nbytes]``)."""
        for i, base in enumerate(self.free):
            if base.numel() >= nbytes:
                return self.free.pop(i)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def give_back(self, base: torch.Tensor) -> None:
        """``base`` may be given out again, if nothing but it holds its memory any more."""
        if self.device.type == "cpu" and held_only_here(base):
            self.free = sorted([*self.free, base], key=torch.Tensor.numel)[-self.keep :]


def held_only_here(base: torch.Tensor) -> bool:
    """Nothing but ``base`` itself holds its memory (no view of it is alive anywhere)."""
    try:  # the tensor's reference + the storage object made for asking
        return torch._C._storage_Use_Count(base.untyped_storage()._cdata) <= 2
    except AttributeError:  # another torch: never give out again rather than guess
        return False
