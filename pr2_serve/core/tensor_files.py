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

__all__ = ["iter_tensors", "read_layout"]


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
    by_file: dict[str, list[str]] = {}
    for name, path in wanted.items():
        by_file.setdefault(str(path), []).append(name)
    for path, group in by_file.items():
        start, header = read_layout(path)
        group.sort(key=lambda n: header[n]["data_offsets"][0])
        with open(path, "rb", buffering=0) as f:
            for name in group:
                meta = header[name]
                a, b = meta["data_offsets"]
                buf = torch.empty(b - a, dtype=torch.uint8)
                f.seek(start + a)
                _read_into(f, memoryview(buf.numpy()), f"{path}: {name}")
                yield name, buf.view(_TYPES[meta["dtype"]]).reshape(meta["shape"])


def _read_into(f, view: memoryview, what: str) -> None:
    while view:
        n = f.readinto(view)
        if not n:
            raise ValueError(f"{what} is truncated")
        view = view[n:]
