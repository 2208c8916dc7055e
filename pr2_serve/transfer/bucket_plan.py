"""How a weight transfer cuts its tensors into buckets: packed in order, a bucket closes once its
size exceeds ``bucket_bytes`` (the tensor that crosses the line is in it), the rule of vLLM's
``pack_tensors`` and ``packed_nccl_broadcast_consumer``. Pure torch: the GPU check imports it on
a machine without vLLM."""

from __future__ import annotations

import math

import torch

__all__ = ["DEFAULT_BUCKET_BYTES", "plan_buckets", "tensor_nbytes"]

DEFAULT_BUCKET_BYTES = 16 << 20
"""Packed bucket size: each end holds two or three buffers of about this size. Under glibc's
largest mmap threshold (32 MiB), so a buffer freed is reused by the next one from the heap
instead of being mapped anew and page-faulted in (64 MiB buckets cost ~20% of the end-to-end
rate of a transfer here: ``benchmarks/weights.py``)."""


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(int(s) for s in shape) * dtype.itemsize


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` tensor index ranges of the buckets of tensors of ``sizes`` bytes."""
    buckets, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total > bucket_bytes:
            buckets.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        buckets.append((start, len(sizes)))
    return buckets
