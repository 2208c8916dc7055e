"""How weights are cut into buckets, for every path (a transfer, an upload, a load from files):
packed in order, a bucket closes once its size exceeds ``bucket_bytes`` (the tensor that crosses
the line is in it), the rule of vLLM's ``pack_tensors`` and ``packed_nccl_broadcast_consumer``.
Pure torch: the GPU check imports it on a machine without vLLM."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

__all__ = ["DEFAULT_BUCKET_BYTES", "grouped", "pair_nbytes", "plan_buckets", "tensor_nbytes"]

T = TypeVar("T")

DEFAULT_BUCKET_BYTES = 16 << 20
"""Packed bucket size: each end holds two or three buffers of about this size. The sender packs
each bucket anew (vLLM's ``pack_tensors``): under glibc's largest mmap threshold (32 MiB) a
buffer freed is reused by the next one from the heap instead of being mapped anew and
page-faulted in (64 MiB buckets cost ~20% of the end-to-end rate of a transfer here, measured
with ``benchmarks/weights.py`` while the receiver still did the same; it now receives into two
mappings of its own, reused: :mod:`pr2_serve.core.reused_buffers`)."""


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(int(s) for s in shape) * dtype.itemsize


def pair_nbytes(pair: tuple[str, torch.Tensor]) -> int:
    """The bytes of a ``(name, tensor)`` pair's tensor."""
    return pair[1].numel() * pair[1].element_size()


def grouped(items: Iterable[T], nbytes: Callable[[T], int], bucket_bytes: int) -> Iterator[list[T]]:
    """``items`` in order, in lists: a list closes once its ``nbytes`` sum exceeds
    ``bucket_bytes`` (lazily: an item is taken when the list it joins is being made)."""
    bucket, total = [], 0
    for item in items:
        bucket.append(item)
        total += nbytes(item)
        if total > bucket_bytes:
            yield bucket
            bucket, total = [], 0
    if bucket:
        yield bucket


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` index ranges of the buckets of tensors of ``sizes`` bytes."""
    plan, start = [], 0
    for bucket in grouped(sizes, int, bucket_bytes):
        plan.append((start, start + len(bucket)))
        start += len(bucket)
    return plan
