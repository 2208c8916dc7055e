"""Read tensors out of safetensors files one at a time into the process's own memory.

``safetensors.safe_open`` memory-maps the whole file: every page a pass touches stays mapped
(and counted in the server's RSS) until the file is closed, so a pass over a 200 MB update
grows the RSS by 200 MB. :func:`iter_tensors` reads each tensor with ``readinto`` into a buffer
of its own instead (a copy out of the page cache, no page faults); a tensor's memory is freed
as soon as the caller drops it, so a pass holds what the caller keeps, not the file. Tensors are
read in file order (sequential reads). Headers are parsed by ``safe_open`` (the format's own
checks: offsets in bounds, no overlap).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping

import torch

__all__ = ["iter_buckets", "iter_tensors", "read_layout"]


def read_layout(path: str) -> tuple[int, dict[str, dict]]:
    """``(data start, {name: {"dtype", "shape", "data_offsets"}})`` of a safetensors file,
    checked by ``safe_open`` (raises on a malformed or truncated file)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt"):  # the format's own validation
        pass
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def iter_tensors(files: Mapping[str, str], names: Iterable[str] | None = None) -> Iterator:
    """``(name, tensor)`` for ``{name: file}`` (or only ``names`` of it), each file opened once,
    each tensor read into its own CPU buffer (see module docstring)."""
    from safetensors.torch import _TYPES

    wanted = files if names is None else {n: files[n] for n in names}
    with _Reader() as reader:
        for name, path, start, meta in _in_file_order(wanted):
            a, b = meta["data_offsets"]
            buf = torch.empty(b - a, dtype=torch.uint8)
            reader.read(path, start + a, buf, name)
            yield name, buf.view(_TYPES[meta["dtype"]]).reshape(meta["shape"])


def iter_buckets(files: Mapping[str, str], bucket_bytes: int) -> Iterator[list]:
    """:func:`iter_tensors` in buckets (:func:`~pr2_serve.transfer.bucket_plan.grouped`), each
    bucket's tensors read into one buffer, 8-byte aligned: the bucket before the one just
    given out is read over once nothing holds it any more (:mod:`pr2_serve.core.reused_buffers`:
    two buffers serve a whole pass when the caller copies each tensor out)."""
    from safetensors.torch import _TYPES

    from pr2_serve.core.reused_buffers import ReusedBuffers
    from pr2_serve.transfer.bucket_plan import grouped

    def nbytes(entry) -> int:
        a, b = entry[3]["data_offsets"]
        return b - a

    buffers, given = ReusedBuffers(), []
    with _Reader() as reader:
        for bucket in grouped(_in_file_order(files), nbytes, bucket_bytes):
            base = buffers.take(sum(_aligned(nbytes(e)) for e in bucket))
            pairs, pos = [], 0
            for name, path, start, meta in bucket:
                view = base[pos : pos + nbytes((name, path, start, meta))]
                reader.read(path, start + meta["data_offsets"][0], view, name)
                pairs.append((name, view.view(_TYPES[meta["dtype"]]).reshape(meta["shape"])))
                pos += _aligned(view.numel())
            given.append(base)
            yield pairs
            del pairs, view
            if len(given) > 1:  # the caller is done with the bucket before the one just given
                buffers.give_back(given.pop(0))


def _in_file_order(files: Mapping[str, str]) -> Iterator[tuple[str, str, int, dict]]:
    """``(name, file, data start, header entry)`` of ``{name: file}``, file by file, each in
    offset order (sequential reads); a file's header is read when its turn comes."""
    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(str(path), []).append(name)
    for path, group in by_file.items():
        start, header = read_layout(path)
        group.sort(key=lambda n: header[n]["data_offsets"][0])
        for name in group:
            yield name, path, start, header[name]


class _Reader:
    """Files opened once each, read at an offset into a CPU tensor; closed on exit."""

    def __init__(self) -> None:
        self.opened: dict[str, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for f in self.opened.values():
            f.close()

    def read(self, path: str, offset: int, into: torch.Tensor, name: str) -> None:
        if path not in self.opened:
            self.opened[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed on exit
        f = self.opened[path]
        f.seek(offset)
        _read_into(f, memoryview(into.numpy()), f"{path}: {name}")


def _aligned(n: int) -> int:
    return n + (-n % 8)


def _read_into(f, view: memoryview, what: str) -> None:
    while view:
        n = f.readinto(view)
        if not n:
            raise ValueError(f"{what} is truncated")
        view = view[n:]
