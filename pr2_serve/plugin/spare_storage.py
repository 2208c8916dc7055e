"""The storage a committed update let go of, kept for the next update's new tensors (CPU).

On the CPU a live update loads each swapping layer into new tensors and swaps them in, while
the undo keeps the old ones until the update is committed (:mod:`pr2_serve.plugin.swap_reload`).
Freed then, that memory went back to the system, and the next update's new tensors faulted as
much in again, page by page: ~38 000 minor faults per 214 MB update here (measured on the
server, ``/proc/PID/stat``), on the engine thread, which is what an update waits on. Kept here
instead, the next update's tensors are made in it.

What is kept is what the undo held, so the memory an update peaks at stays reserved between
updates instead of being given back and taken again (as a GPU's caching allocator keeps the
blocks it frees); the peak itself does not grow: an update takes spare storage for its new
tensors while the undo holds the old ones, which become the spare once it is committed (and
only they: the spare is at most the last update's undo, so an update that touches other layers
than the last one, finding no spare of their sizes, peaks at most that much higher). Only
storage nothing else holds is used again (a tensor still seen elsewhere is forgotten, never
written over). Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pr2_serve.core.reused_buffers import storage_holders

__all__ = ["SpareStorage"]


class SpareStorage:
    """Kept CPU storages by size in bytes (see module docstring)."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.UntypedStorage]] = {}

    @property
    def nbytes(self) -> int:
        return sum(n * len(kept) for n, kept in self._free.items())

    def keep(self, tensors: Iterable[torch.Tensor]) -> None:
        """Keep the storage of each CPU tensor (each storage once) for :meth:`like`."""
        seen = {s.data_ptr() for kept in self._free.values() for s in kept}
        for t in tensors:
            storage = t.untyped_storage()
            if t.device.type != "cpu" or storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            self._free.setdefault(storage.nbytes(), []).append(storage)

    def like(self, meta: torch.Tensor) -> torch.Tensor:
        """What vLLM's ``materialize_meta_tensor`` makes of ``meta`` (a CPU tensor of its
        size, strides and dtype, its class and attributes, values not set), in a kept storage
        of exactly its size when one is free."""
        size, stride = tuple(meta.size()), tuple(meta.stride())
        storage = self._take(_span(size, stride) * meta.element_size())
        if storage is None:
            tensor = torch.empty_strided(size, stride, dtype=meta.dtype, requires_grad=False)
        else:
            tensor = torch.empty(0, dtype=meta.dtype).set_(storage, 0, size, stride)
        tensor.__class__ = meta.__class__
        tensor.__dict__ = meta.__dict__.copy()
        return tensor

    def clear(self) -> None:
        self._free.clear()

    def _take(self, nbytes: int) -> torch.UntypedStorage | None:
        kept = self._free.get(nbytes, [])
        while kept:
            storage = kept.pop()
            if storage_holders(storage) == 1:  # this storage object alone
                return storage
        return None


def _span(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements a tensor of ``size`` and ``stride`` spans in its storage."""
    if 0 in size:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
