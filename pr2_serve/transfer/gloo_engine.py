"""``GlooWeightTransferEngine``: the worker side of a gloo transfer (inside the vLLM worker).

Made by vLLM's ``WeightTransferEngineFactory`` when the engine's ``weight_transfer_config`` says
``gloo``; driven by the worker's ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update`` (``collective_rpc``), inside the update session the
engine opened (:mod:`pr2_serve.plugin.live_update`). ``update_weights`` receives the trainer's
packed buckets and, as each arrives, checks it and loads it into the live model (the session
keeps the undo) while the next one is on the wire; each bucket is also written at its place in
a safetensors file laid out from the update info (``GlooUpdateInfo.path``, on a writer thread):
the version's durable copy, complete once ``finish_weight_update`` returns (the engine calls it
after the canary: the writes end while the update finishes). A bucket that fails its check stops
the loading, the rest is still received (the broadcast stays in step), then the error is raised
and the engine undoes the update. With several workers (tensor parallel) each receives and loads
every bucket and only the first writes.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

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
        self.writing: _Writer | None = None  # the last update's file writes, still going on

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
        with contextlib.suppress(Exception):
            self.finish_weight_update()  # writes an aborted update left going

    def finish_weight_update(self) -> None:
        """Wait until the received buckets are written (they are written while the engine
        finishes the update and runs the canary); raise a write that failed."""
        writing, self.writing = self.writing, None
        if writing is not None:
            writing.close()

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

        self.writing = receive_and_apply(
            recv, update_info, self.init_info.bucket_bytes, path, apply, wait_writes=False
        )

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


def receive_and_apply(
    recv, info: GlooUpdateInfo, bucket_bytes: int, path, apply, device="cpu", wait_writes=True
):
    """Receive every bucket of ``info`` into a buffer on ``device`` with ``recv(buffer)`` (a
    broadcast from the trainer; the buffer is complete when it returns), the next one while
    ``apply`` checks and loads one (None: nothing is loaded); write them to ``path`` (a
    complete safetensors file; None: not written). The first error ``apply`` raises stops the
    applying, not the receiving, and is raised at the end (after the writes). ``wait_writes``
    False: return the writer, whose :meth:`~_Writer.close` waits for the writes (the caller's
    to call), instead of waiting here."""
    sizes = info.nbytes()
    prefix, offsets = safetensors_layout(info)

    def arrivals():
        for a, b in plan_buckets(sizes, bucket_bytes):
            # each bucket its own buffer: the reload may keep views until a layer is whole
            buf = torch.empty(sum(sizes[a:b]), dtype=torch.uint8, device=device)
            recv(buf)
            yield a, b, buf

    error, writer = None, _Writer(path, prefix, sum(sizes))
    try:
        for a, b, buf in prefetched(arrivals()):
            writer.put(buf, len(prefix) + offsets[a])
            if error is None and apply is not None:
                try:
                    apply(unpack_bucket(info, a, b, buf))
                except Exception as e:
                    error = e
    except BaseException:
        writer.close()
        raise
    if error is not None or wait_writes:
        writer.close()
    if error is not None:
        raise error
    return None if wait_writes else writer


class _Writer:
    """Writes buckets at their offsets in a file on a thread (nothing when ``path`` is None)."""

    AHEAD = 2  # buckets queued for writing at most

    def __init__(self, path, prefix: bytes, data_bytes: int) -> None:
        self.fd, self.pending = None, []
        if path is not None:
            # written over, not truncated: the file may be a spare (``WeightStore.reuse_spare``)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(self.fd, prefix, 0)
            os.ftruncate(self.fd, len(prefix) + data_bytes)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pr2-xfer-write")

    def put(self, buf: torch.Tensor, offset: int) -> None:
        """Queue ``buf``'s write; wait while more than ``AHEAD`` are queued (a disk slower than
        the wire holds the receive back instead of piling buckets up in memory)."""
        if self.fd is not None and buf.numel():
            self.pending.append(self.pool.submit(_pwrite, self.fd, buf, offset))
            if len(self.pending) > self.AHEAD:
                self.pending[-self.AHEAD - 1].result()

    def close(self) -> None:
        """Wait for every write (raising the first that failed); idempotent."""
        pending, self.pending = self.pending, []
        try:
            for fut in pending:
                fut.result()
        finally:
            self.pool.shutdown(wait=True)
            if self.fd is not None:
                fd, self.fd = self.fd, None
                os.close(fd)


def _pwrite(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = memoryview(buf.cpu().numpy()).cast("B")  # a GPU bucket is copied to the host here
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
