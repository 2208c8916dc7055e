"""``GlooWeightTransferEngine``: the worker side of a gloo transfer (inside the vLLM worker).

Made by vLLM's ``WeightTransferEngineFactory`` when the engine's ``weight_transfer_config`` says
``gloo``; driven by the worker's ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update`` (``collective_rpc``), inside the update session the
engine opened (:mod:`pr2_serve.plugin.live_update`). ``update_weights`` receives the trainer's
packed buckets and, as each arrives, checks it and loads it into the live model (the session
keeps the undo) while the next one is on the wire; each bucket is also written at its place in
a safetensors file laid out from the update info (``GlooUpdateInfo.path``), on the receiving
thread as it arrives: the version's durable copy, complete when ``update_weights`` returns. A
bucket that fails its check, or a write that fails, stops the loading (the writing), the rest is
still received (the broadcast stays in step), then the error is raised and the engine undoes the
update. With several workers (tensor parallel) each receives and loads every bucket and only the
first writes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from pr2_serve.core.reused_buffers import ReusedBuffers
from pr2_serve.plugin.live_update import live_session, prefetched
from pr2_serve.transfer.protocol import (
    GlooInitInfo,
    GlooUpdateInfo,
    close_group,
    open_group,
    plan_buckets,
    safetensors_layout,
)

__all__ = ["GlooWeightTransferEngine", "receive_and_apply", "unpack_bucket", "worker_rank"]


def worker_rank(parallel_config) -> int:
    """This worker's rank among all the engine's workers (data parallel included)."""
    dp = getattr(parallel_config, "data_parallel_index", 0)
    return dp * parallel_config.world_size + parallel_config.rank


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receive a transfer into the live model and its file (see module docstring)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.init_info: GlooInitInfo | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.shutdown()
        rank = worker_rank(self.parallel_config) + init_info.rank_offset
        if rank >= init_info.world_size:
            raise ValueError(
                f"world_size {init_info.world_size} is too small: this worker would be rank "
                f"{rank} (rank_offset {init_info.rank_offset})"
            )
        self.group = open_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            init_info.timeout_s,
        )
        self.init_info = init_info

    def start_weight_update(self) -> None:
        """(The engine opened the update session, which keeps the undo.)"""

    def finish_weight_update(self) -> None:
        """(``update_weights`` returned with the file complete.)"""

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class also calls torch.accelerator.synchronize(), absent on the CPU build
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None or self.init_info is None:
            raise RuntimeError("gloo weight transfer not initialized: init it first")
        write = worker_rank(self.parallel_config) == 0
        if write and not update_info.path:
            raise ValueError("update info has no path to write the received tensors to")
        path = update_info.path if write else None
        session = live_session(self.model)
        apply = None if session is None else session.apply  # None: only stored (no engine)
        group = self.group

        def recv(buf: torch.Tensor) -> None:
            group.broadcast(buf, root=0).wait()

        receive_and_apply(recv, update_info, self.init_info.bucket_bytes, path, apply)

    def shutdown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            close_group(group)


def unpack_bucket(info: GlooUpdateInfo, start: int, stop: int, buf: torch.Tensor) -> list:
    """``(name, tensor)`` of tensors ``start:stop`` of ``info``: views into ``buf``, the
    bucket's packed bytes (``pack_tensors``' layout: the tensors' bytes end to end; a tensor
    not aligned to its dtype there is copied)."""
    pairs, pos = [], 0
    sizes, dtypes = info.nbytes(), info.dtypes()
    for i in range(start, stop):
        raw = buf[pos : pos + sizes[i]]
        if pos % dtypes[i].itemsize:  # after an odd-sized tensor of a smaller dtype
            raw = raw.clone()
        t = raw.view(dtypes[i]).reshape(info.shapes[i])
        pairs.append((info.names[i], t))
        pos += sizes[i]
    return pairs


def receive_and_apply(recv, info: GlooUpdateInfo, bucket_bytes: int, path, apply, device="cpu"):
    """Receive every bucket of ``info`` into a buffer on ``device`` with ``recv(buffer)`` (a
    broadcast from the trainer; the buffer is complete when it returns) and write it to
    ``path`` (a complete safetensors file; None: not written) on the receiving thread, the next
    one while ``apply`` checks and loads one (None: nothing is loaded). So at most two buckets
    exist at once (on the CPU in the same two buffers: :mod:`pr2_serve.core.reused_buffers`),
    and a disk slower than the wire holds the receive back (the file is usually a spare written
    over: a copy into cached pages). The first error ``apply`` or a write raises stops the
    applying or writing, not the receiving, and is raised at the end."""
    sizes = info.nbytes()
    prefix, offsets = safetensors_layout(info)
    writer, buffers = _Writer(path, prefix, sum(sizes)), ReusedBuffers(device)

    def arrivals():
        plan = plan_buckets(sizes, bucket_bytes)
        for a, b in plan:
            n = sum(sizes[a:b])
            buf = buffers.take(n, last=b == plan[-1][1])[:n]  # in use while a view is alive
            recv(buf)
            writer.put(buf, len(prefix) + offsets[a])
            yield a, b, buf

    error = None
    try:
        for a, b, buf in prefetched(arrivals()):
            if error is None and apply is not None:
                try:
                    apply(unpack_bucket(info, a, b, buf))
                except Exception as e:
                    error = e
            del buf  # applied: its buffer is received into again (if the loader kept no view)
    except BaseException:
        writer.close(raise_error=False)  # the receive's own error, not a write's
        raise
    writer.close(raise_error=error is None)
    if error is not None:
        raise error


class _Writer:
    """Writes buckets at their offsets in a file (nothing when ``path`` is None); the first
    write that fails stops the writing and is raised by :meth:`close`."""

    def __init__(self, path, prefix: bytes, data_bytes: int) -> None:
        self.fd, self.error = None, None
        if path is not None:
            # written over, not truncated: the file may be a spare (``WeightStore.reuse_spare``)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(self.fd, prefix, 0)
            os.ftruncate(self.fd, len(prefix) + data_bytes)

    def put(self, buf: torch.Tensor, offset: int) -> None:
        if self.fd is not None and self.error is None and buf.numel():
            try:
                _pwrite(self.fd, buf, offset)
            except OSError as e:
                self.error = e

    def close(self, raise_error: bool = True) -> None:
        """Close the file (idempotent); raise the write that failed, if any."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        if raise_error and self.error is not None:
            raise self.error


def _pwrite(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = memoryview(buf.cpu().numpy()).cast("B")  # a GPU bucket is copied to the host here
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
