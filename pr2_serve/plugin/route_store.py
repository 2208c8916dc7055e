"""Worker-side bookkeeping that turns per-step route rows into per-request route arrays.

Pure numpy (no vLLM import), so it is unit-tested on its own. After every model step the worker
hands over the step's captured rows ``[n, layers, k]`` with, per row, the KV-cache slot and the
token position it was computed for, and which request each run of rows belongs to.

Two stores:

- **slot store** ``[num_slots, layers, k]``: the route of whatever token currently occupies each
  KV-cache slot. A prefix-cache hit skips computing the cached positions, but their KV entries --
  and so their routes -- are still in those slots: a request that starts at position ``p0 > 0``
  gets rows ``0..p0`` read back through its block table. Routes therefore stay correct with
  prefix caching (the engine flushes the prefix cache on every weight update, so a cached block
  never mixes weight versions).
- **per-request rows**, grown as positions are computed. A preempted request that is recomputed
  keeps the rows it had (the ones its sampled tokens were produced with); only new positions are
  appended. Chunked prefill and continuous batching are just runs of consecutive positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RouteStore"]


@dataclass(slots=True)
class _Request:
    rows: np.ndarray
    length: int = 0
    finished_at: float | None = None


class RouteStore:
    """Per-request route arrays built from per-step captures (see module docstring)."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        top_k: int,
        dtype: np.dtype,
        block_size: int,
        unclaimed_ttl_s: float = 600.0,
    ) -> None:
        self.shape = (num_layers, top_k)
        self.dtype = np.dtype(dtype)
        self.block_size = block_size
        self.slots = np.zeros((num_slots, *self.shape), dtype=self.dtype)
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self._requests: dict[str, _Request] = {}
        # observability (and proof in tests that the paths below really ran)
        self.stats = {"steps": 0, "rows": 0, "prefix_cache_rows": 0, "recomputed_rows": 0}

    # -- per step -------------------------------------------------------------------------------
    def on_step(
        self,
        rows: np.ndarray,
        slots: np.ndarray,
        positions: np.ndarray,
        keys: Sequence[str | None],
        bounds: np.ndarray,
        block_row: Callable[[int], np.ndarray],
    ) -> None:
        """Record one step: ``rows[i]`` was computed at KV slot ``slots[i]``, ``positions[i]``.

        Request ``j`` of the step (store key ``keys[j]``, None if untracked) owns rows
        ``bounds[j]:bounds[j + 1]``; ``block_row(j)`` returns its kernel block ids, read only on
        a prefix-cache hit.
        """
        rows = rows.astype(self.dtype, copy=False)
        self.stats["steps"] += 1
        self.stats["rows"] += len(rows)
        valid = slots >= 0
        if valid.all():
            self._ensure_slots(int(slots.max(initial=-1)) + 1)
            self.slots[slots] = rows
        else:
            self._ensure_slots(int(slots[valid].max(initial=-1)) + 1)
            self.slots[slots[valid]] = rows[valid]
        bounds = bounds.tolist()
        starts = positions[bounds[:-1]].tolist() if keys else []
        for j, key in enumerate(keys):
            if key is None:
                continue
            lo, hi = bounds[j], bounds[j + 1]
            if hi <= lo:
                continue
            req = self._requests.get(key)
            if req is None:
                req = self._requests[key] = _Request(
                    np.zeros((max(64, 2 * (hi - lo)), *self.shape), self.dtype)
                )
            p0 = starts[j]
            if p0 > req.length:
                # prefix-cache hit: positions length..p0 were computed earlier, read their slots
                self.stats["prefix_cache_rows"] += p0 - req.length
                self._write(req, req.length, self._read_slots(block_row(j), req.length, p0))
            end = p0 + (hi - lo)
            self.stats["recomputed_rows"] += max(0, min(end, req.length) - p0)
            if end > req.length:  # keep rows already recorded (preemption recompute)
                self._write(req, req.length, rows[lo + req.length - p0 : hi])

    def on_finished(self, keys: Sequence[str]) -> None:
        """Requests the scheduler finished or aborted: keep their rows until claimed (or TTL)."""
        now = time.monotonic()
        for key in keys:
            req = self._requests.get(key)
            if req is not None and req.finished_at is None:
                req.finished_at = now
        self._evict(now)

    # -- readout --------------------------------------------------------------------------------
    def take(self, key: str, num_rows: int | None = None) -> np.ndarray | None:
        """Remove and return the request's rows (``[:num_rows]`` when given), None if unknown."""
        req = self._requests.pop(key, None)
        if req is None:
            return None
        n = req.length if num_rows is None else min(num_rows, req.length)
        return req.rows[:n].copy()

    def peek(self, key: str, start: int = 0, end: int | None = None) -> np.ndarray | None:
        """Rows ``start:end`` recorded so far, leaving the request in place (for streaming)."""
        req = self._requests.get(key)
        if req is None:
            return None
        stop = req.length if end is None else min(end, req.length)
        return req.rows[start:stop].copy()

    def __len__(self) -> int:
        return len(self._requests)

    # -- internals ------------------------------------------------------------------------------
    def _read_slots(self, block_row: np.ndarray, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        slots = block_row[pos // self.block_size].astype(np.int64) * self.block_size
        return self.slots[slots + pos % self.block_size]

    def _write(self, req: _Request, at: int, rows: np.ndarray) -> None:
        end = at + len(rows)
        if end > len(req.rows):
            grown = np.zeros((max(end, 2 * len(req.rows)), *self.shape), self.dtype)
            grown[: req.length] = req.rows[: req.length]
            req.rows = grown
        req.rows[at:end] = rows
        req.length = max(req.length, end)

    def _ensure_slots(self, n: int) -> None:
        if n > len(self.slots):
            grown = np.zeros((max(n, 2 * len(self.slots)), *self.shape), self.dtype)
            grown[: len(self.slots)] = self.slots
            self.slots = grown

    def _evict(self, now: float) -> None:
        stale = [
            k
            for k, r in self._requests.items()
            if r.finished_at is not None and now - r.finished_at > self.unclaimed_ttl_s
        ]
        for k in stale:
            del self._requests[k]
