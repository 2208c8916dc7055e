"""What both ends of a gloo transfer agree on: init and update infos, the bucket plan, the
staged file's layout, and the group.

- **Init** (worker side, :class:`GlooInitInfo`): the rendezvous (``master_address``,
  ``master_port``: the trainer's TCPStore), ``world_size`` (the trainer + every server's
  workers), ``rank_offset`` (this server's first rank), and the wire params the trainer decides
  (``bucket_bytes``, ``timeout_s``) so the two sides cannot disagree.
- **Update** (:class:`GlooUpdateInfo`): upstream's ``{names, dtype_names, shapes}``; the server
  adds ``path``, the file the worker writes.
- **Buckets** (:mod:`pr2_serve.transfer.bucket_plan`): tensors packed in order, a bucket closing
  once its size exceeds ``bucket_bytes``, as vLLM's ``pack_tensors`` does.
- **File** (:func:`safetensors_layout`): the safetensors header for the tensors in broadcast
  order, so bucket ``k`` is one contiguous byte range of the file.
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from pr2_serve.core.served_checkpoint import st_dtype
from pr2_serve.transfer.bucket_plan import DEFAULT_BUCKET_BYTES, plan_buckets, tensor_nbytes

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_TIMEOUT_S",
    "GlooInitInfo",
    "GlooTrainerInitInfo",
    "GlooUpdateInfo",
    "open_group",
    "plan_buckets",
    "safetensors_layout",
    "tensor_nbytes",
]

DEFAULT_TIMEOUT_S = 120.0
"""How long a rendezvous or one collective may wait for a peer before failing."""


@dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    """Worker-side init info (the ``init_weight_transfer_engine`` payload)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.world_size < 2 or not 1 <= self.rank_offset < self.world_size:
            raise ValueError(
                f"world_size {self.world_size} / rank_offset {self.rank_offset}: the group is "
                "the trainer (rank 0) + every server's workers, so 1 <= rank_offset < world_size"
            )
        if self.bucket_bytes < 1 or self.timeout_s <= 0:
            raise ValueError("bucket_bytes and timeout_s must be positive")


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info; ``WeightTransferTrainerFactory`` dispatches on ``backend``."""

    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """Per-transfer metadata, in broadcast order; ``path``: where the worker writes them (the
    durable copy of the version, laid out by :func:`safetensors_layout`)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    path: str | None = None

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.dtype_names) != n or len(self.shapes) != n:
            raise ValueError(
                f"names, dtypes and shapes differ in length: {n}, {len(self.dtype_names)}, "
                f"{len(self.shapes)}"
            )
        if len(set(self.names)) != n:
            raise ValueError("names: a tensor is named twice")
        for name, dt in zip(self.names, self.dtype_names, strict=True):
            if not isinstance(getattr(torch, dt, None), torch.dtype):
                raise ValueError(f"{name}: unknown dtype {dt!r} (torch names: 'bfloat16', ...)")

    def dtypes(self) -> list[torch.dtype]:
        return [getattr(torch, d) for d in self.dtype_names]

    def nbytes(self) -> list[int]:
        return [tensor_nbytes(s, d) for s, d in zip(self.shapes, self.dtypes(), strict=True)]


def safetensors_layout(info: GlooUpdateInfo) -> tuple[bytes, list[int]]:
    """The file prefix (8-byte header length + JSON header, space-padded to 8 bytes) and each
    tensor's byte offset in the data section, tensors stored in broadcast order."""
    header, offsets, pos = {}, [], 0
    for name, shape, dtype, size in zip(
        info.names, info.shapes, info.dtypes(), info.nbytes(), strict=True
    ):
        header[name] = {
            "dtype": st_dtype(dtype),
            "shape": [int(s) for s in shape],
            "data_offsets": [pos, pos + size],
        }
        offsets.append(pos)
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group outside torch's global state (vLLM's stateless helper); rank 0
    (the trainer) hosts the TCPStore."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        address, port, rank, world_size, "gloo", timeout=timedelta(seconds=timeout_s)
    )


def close_group(group) -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    with contextlib.suppress(Exception):  # a group broken by a failed transfer
        stateless_destroy_torch_distributed_process_group(group)
