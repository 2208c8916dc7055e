"""The body of a weight push: one safetensors file, from disk, from bytes, or streamed straight
from in-memory tensors.

A state dict is never written to a temporary file nor copied into one big buffer: its
safetensors encoding is the header (names, dtypes, shapes, offsets: the format of
https://huggingface.co/docs/safetensors, byte-for-byte what ``safetensors.torch.save`` makes
for the same tensors) followed by each tensor's own memory, and the upload reads those
buffers in place. The caller must leave the tensors unchanged until the push returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pr2_serve.core.body_checksum import hexdigest_of

CHUNK = 4 << 20

__all__ = ["CHUNK", "WeightsPayload", "safetensors_parts", "weights_payload"]


@dataclass(frozen=True, slots=True)
class WeightsPayload:
    """A safetensors file as ``parts`` (buffers, concatenated in order) or a ``path``, with its
    size and checksum (``algorithm``: ``xxh128`` or ``sha256``, see
    :mod:`pr2_serve.core.body_checksum`; computed once, when made by :func:`weights_payload`: a
    payload pushed to several servers is hashed once)."""

    parts: tuple
    path: Path | None
    size: int
    algorithm: str
    digest: str

    @property
    def sha256(self) -> str:
        """The body's SHA-256 (computed on each call: for tools that want it; not sent)."""
        h = hashlib.sha256()
        for block in self.chunks():
            h.update(block)
        return h.hexdigest()

    def chunks(self, size: int = CHUNK) -> Iterator:
        """The body in blocks of at most ``size`` bytes (views where it is in memory; a new
        iterator per call: a re-sent push reads again)."""
        if self.path:
            return _file_chunks(self.path, size)
        return (p[i : i + size] for p in self.parts for i in range(0, len(p), size))


def weights_payload(weights: Any, checksum: str = "xxh128") -> WeightsPayload:
    """What a push sends: a :class:`WeightsPayload` as it is, safetensors ``bytes``, a state
    dict ``{name: tensor}`` (streamed from its tensors), or the safetensors file at a path;
    ``checksum``: the algorithm it declares (``sha256`` for servers older than ``xxh128``)."""
    if isinstance(weights, WeightsPayload):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        digest = hexdigest_of(checksum, _file_chunks(path, CHUNK))
        return WeightsPayload((), path, path.stat().st_size, checksum, digest)
    if isinstance(weights, (bytes, bytearray, memoryview)):
        parts = (memoryview(weights).cast("B"),)
    elif isinstance(weights, Mapping):
        parts = tuple(safetensors_parts(weights, {"format": "pt"}))
    else:
        raise TypeError(f"weights must be bytes, a state dict or a path, not {type(weights)}")
    size = sum(len(p) for p in parts)
    return WeightsPayload(parts, None, size, checksum, hexdigest_of(checksum, parts))


def safetensors_parts(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> list[memoryview]:
    """The safetensors encoding of ``tensors`` as buffers: the header, then each tensor's bytes
    (its own memory when it is a contiguous CPU tensor; others are copied to one first).

    Order and header as ``safetensors.torch.save``: larger dtypes first, then by name."""
    from safetensors.torch import _SIZE, _TYPES

    names = {dtype: name for name, dtype in _TYPES.items()}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    order = sorted(cpu, key=lambda k: (-_SIZE[cpu[k].dtype], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        t = cpu[k]
        end = offset + t.numel() * _SIZE[t.dtype]
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = memoryview(struct.pack("<Q", len(text)) + text)
    return [head] + [_buffer(cpu[k]) for k in order if cpu[k].numel()]


def _buffer(t) -> memoryview:
    """The bytes of a contiguous CPU tensor, in place (little-endian, as safetensors stores)."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block
