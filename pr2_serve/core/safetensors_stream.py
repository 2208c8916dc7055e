"""A safetensors body read as it arrives: its header first, then its tensors in buckets.

The format (https://huggingface.co/docs/safetensors): 8 bytes, the little-endian length ``N`` of
a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}``,
then the data, every tensor's bytes at its offsets. The header is checked by the format's own
rules (as the ``safetensors`` library checks a file): ``N`` at most 100 MB, known dtypes, each
tensor's byte count ``numel x itemsize``, the tensors covering the data exactly (no gap, no
overlap), so the whole body's length is known once the header is in.

:class:`SafetensorsStream` is fed the body in chunks of any size and hands back what is complete:
the header's bytes, then buckets of whole tensors in file order (the rule of every path,
:func:`pr2_serve.transfer.bucket_plan.grouped`: a bucket closes once past ``bucket_bytes``),
each one buffer that its tensors are views of. Nothing is copied but the chunk into its
bucket's buffer. :meth:`~SafetensorsStream.pieces` hands them out lazily: the next bucket's
buffer is taken only when the caller asks for more, so one that hands each bucket on before
asking holds at most two; a buffer nothing holds any more is filled again
(:mod:`pr2_serve.core.reused_buffers`), and the ones not in use are let go once the last bucket
is begun.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pr2_serve.core.reused_buffers import ReusedBuffers
from pr2_serve.transfer.bucket_plan import grouped

__all__ = ["Bucket", "Entry", "Layout", "SafetensorsStream", "parse_header"]

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor of the header: ``[begin, end)`` bytes of the data."""

    name: str
    dtype: torch.dtype
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int

    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Layout:
    """A checked header: its tensors in data order, where the data starts, the body's length."""

    entries: tuple[Entry, ...]
    data_start: int
    total: int


@dataclass(slots=True)
class Bucket:
    """Whole tensors, in file order, backed by ``data`` (the body's bytes they cover)."""

    pairs: list[tuple[str, torch.Tensor]]
    data: memoryview


def parse_header(raw: bytes) -> Layout:
    """The :class:`Layout` of the JSON header ``raw`` (the ``N`` bytes after the length);
    ``ValueError`` naming the tensor and the rule it breaks."""
    from safetensors.torch import _SIZE, _TYPES

    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    entries = sorted((_entry(n, m, _TYPES) for n, m in header.items()), key=lambda e: e.begin)
    offset = 0
    for e in entries:
        if e.begin != offset:
            raise ValueError(f"{e.name}: data_offsets start at {e.begin}, expected {offset}")
        if e.end - e.begin != math.prod(e.shape) * _SIZE[e.dtype]:
            raise ValueError(
                f"{e.name}: data_offsets cover {e.end - e.begin} bytes, its dtype and shape "
                f"{math.prod(e.shape) * _SIZE[e.dtype]}"
            )
        offset = e.end
    return Layout(tuple(entries), 8 + len(raw), 8 + len(raw) + offset)


def _entry(name, meta, types) -> Entry:
    try:
        dtype_name, shape = meta["dtype"], tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        ok = all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok or end < begin:
        raise ValueError(f"{name}: not a safetensors tensor entry: {json.dumps(meta)[:200]}")
    if dtype_name not in types:
        raise ValueError(f"{name}: unknown safetensors dtype {dtype_name!r}")
    return Entry(name, types[dtype_name], dtype_name, shape, begin, end)


class SafetensorsStream:
    """Feed a safetensors body chunk by chunk; :meth:`feed` returns what became complete (see
    module docstring): the header's bytes once (``bytes``), then :class:`Bucket` s."""

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes
        self.layout: Layout | None = None
        self.received = 0
        self._head = bytearray()
        self._plan: list[list[Entry]] = []
        self._bucket: torch.Tensor | None = None  # the bucket being filled
        self._buffers = ReusedBuffers()
        self._filled = 0

    def feed(self, chunk) -> list:
        """Take the next ``chunk`` of the body; what it completed, in order. ``ValueError``
        on a malformed header or bytes past the body's end."""
        return list(self.pieces(chunk))

    def pieces(self, chunk) -> Iterator:
        """:meth:`feed`, lazily: what ``chunk`` completes, each as soon as it is complete; the
        rest of ``chunk`` is taken (into a new bucket) only when the next one is asked for."""
        view = memoryview(chunk).cast("B")
        self.received += len(view)
        out: list = []
        if self.layout is None:
            view = self._take_header(view, out)
        yield from out
        while view.nbytes:
            if not self._plan:
                raise ValueError(
                    f"the body is longer than its safetensors header describes "
                    f"({self.layout.total} bytes)"
                )
            out = []
            view = self._fill(view, out)
            yield from out

    @property
    def complete(self) -> bool:
        return self.layout is not None and not self._plan

    def _take_header(self, view: memoryview, out: list) -> memoryview:
        while self.layout is None and view.nbytes:
            need = 8 if len(self._head) < 8 else 8 + self._header_len()
            take = min(need - len(self._head), view.nbytes)
            self._head += view[:take]
            view = view[take:]
            if len(self._head) == 8 and self._header_len() > MAX_HEADER_BYTES:
                raise ValueError(
                    f"the safetensors header is {self._header_len()} bytes, over the format's "
                    f"limit {MAX_HEADER_BYTES}"
                )
            if len(self._head) >= 8 and len(self._head) == 8 + self._header_len():
                self.layout = parse_header(bytes(self._head[8:]))
                self._plan = list(grouped(self.layout.entries, Entry.nbytes, self.bucket_bytes))
                out.append(bytes(self._head))
                self._flush_empty(out)
        return view

    def _header_len(self) -> int:
        return struct.unpack("<Q", self._head[:8])[0]

    def _fill(self, view: memoryview, out: list) -> memoryview:
        entries = self._plan[0]
        size = entries[-1].end - entries[0].begin
        if self._bucket is None:
            base = self._buffers.take(size, last=len(self._plan) == 1)
            self._bucket, self._filled = base[:size], 0
        take = min(size - self._filled, view.nbytes)
        memoryview(self._bucket.numpy())[self._filled : self._filled + take] = view[:take]
        self._filled += take
        if self._filled == size:
            out.append(_bucket(self._bucket, self._plan.pop(0)))
            self._bucket = None
            self._flush_empty(out)
        return view[take:]

    def _flush_empty(self, out: list) -> None:
        """Buckets of zero bytes (empty tensors only) are complete as soon as they come up."""
        while self._plan and self._plan[0][-1].end == self._plan[0][0].begin:
            out.append(_bucket(torch.empty(0, dtype=torch.uint8), self._plan.pop(0)))


def _bucket(data: torch.Tensor, entries: list[Entry]) -> Bucket:
    base = entries[0].begin
    pairs = [(e.name, _view(data[e.begin - base : e.end - base], e)) for e in entries]
    return Bucket(pairs, memoryview(data.numpy()).cast("B"))


def _view(raw: torch.Tensor, e: Entry) -> torch.Tensor:
    """The tensor of ``e`` over its bytes ``raw`` (copied only if misaligned for its dtype)."""
    if raw.numel() == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    size = torch.empty((), dtype=e.dtype).element_size()
    if raw.storage_offset() % size:
        raw = raw.clone()
    return raw.view(e.dtype).reshape(e.shape)
