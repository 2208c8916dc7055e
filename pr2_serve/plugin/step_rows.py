"""One model step's route rows, copied to the host without stalling the device.

After a step's kernels are queued, the capture buffer, the token positions and the KV slots are
copied into pinned host memory with ``non_blocking=True`` and an event is recorded; the host
reads them one step later (or when routes are asked for), after the event. On the CPU build the
same code runs and the copy is simply complete at once. Everything the step's bookkeeping needs
from the model runner's host state -- which request owns which rows, and the block table rows of
requests new in this step (a prefix-cache hit reads their cached slots) -- is snapshotted at the
step, since the runner reuses those buffers for the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Pending:
    n: int
    bounds: np.ndarray  # query_start_loc of the step's requests
    keys: list[str | None]
    block_rows: dict[int, np.ndarray]  # request index in the step -> kernel block ids
    event: object | None  # torch.cuda.Event, None on the CPU


class StepRows:
    """Deferred host copies of per-step routes (see module docstring)."""

    def __init__(self, max_tokens: int, capture_buffer: torch.Tensor) -> None:
        pin = capture_buffer.is_cuda
        self.rows = torch.empty_like(capture_buffer, device="cpu", pin_memory=pin)
        self.positions = torch.empty(max_tokens, dtype=torch.int64, pin_memory=pin)
        self.slots = torch.empty(max_tokens, dtype=torch.int64, pin_memory=pin)
        self._pending: _Pending | None = None

    def record(self, capture, positions, slots, n, bounds, keys, block_rows) -> None:
        """Queue the copies of step rows ``[:n]`` (call :meth:`flush` before the next one)."""
        assert self._pending is None, "flush the previous step first"
        self.rows[:n].copy_(capture[:n], non_blocking=True)
        self.positions[:n].copy_(positions[:n], non_blocking=True)
        self.slots[:n].copy_(slots[:n], non_blocking=True)
        event = None
        if capture.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = _Pending(n, bounds.copy(), keys, block_rows, event)

    def flush(self, store) -> None:
        """Hand the pending step (if any) to ``store`` once its copies are complete."""
        p, self._pending = self._pending, None
        if p is None:
            return
        if p.event is not None:
            p.event.synchronize()
        store.on_step(
            self.rows[: p.n].numpy(),
            self.slots[: p.n].numpy(),
            self.positions[: p.n].numpy(),
            p.keys,
            p.bounds,
            lambda j: p.block_rows[j],
        )
