"""``GlooWeightTransferEngine``: the worker side of a gloo transfer (inside the vLLM worker).

Made by vLLM's ``WeightTransferEngineFactory`` when the engine's ``weight_transfer_config`` says
``gloo``; driven by the worker's ``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update`` (``collective_rpc``). ``update_weights`` receives
the trainer's packed buckets and writes each at its place in a safetensors file laid out from
the update info (``GlooUpdateInfo.path``); the live model is never touched, so a transfer that
fails half-way changes nothing served. Two receive buffers: a bucket is written to the file on a
thread while the next one arrives. With several workers (tensor parallel) each receives every
bucket and only the first writes.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from pr2_serve.transfer.protocol import (
    GlooInitInfo,
    GlooUpdateInfo,
    close_group,
    open_group,
    plan_buckets,
    safetensors_layout,
)

__all__ = ["GlooWeightTransferEngine", "receive_to_file", "worker_rank"]


def worker_rank(parallel_config) -> int:
    """This worker's rank among all the engine's workers (data parallel included)."""
    dp = getattr(parallel_config, "data_parallel_index", 0)
    return dp * parallel_config.world_size + parallel_config.rank


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receive a transfer into a staged safetensors file (see module docstring)."""

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
        pass  # nothing is loaded into the model: the server applies the finished file

    def finish_weight_update(self) -> None:
        pass

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
        receive_to_file(self.group, update_info, self.init_info.bucket_bytes, path)

    def shutdown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            close_group(group)


def receive_to_file(group, info: GlooUpdateInfo, bucket_bytes: int, path: str | None) -> int:
    """Receive every bucket of ``info`` from rank 0 of ``group``; write them to ``path`` (a
    complete safetensors file; None: receive only). The bytes received."""
    sizes = info.nbytes()
    buckets = plan_buckets(sizes, bucket_bytes)
    largest = max((sum(sizes[a:b]) for a, b in buckets), default=0)
    buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(2)]
    pending: list[Future | None] = [None, None]
    prefix, offsets = safetensors_layout(info)
    fd = None if path is None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pr2-xfer-write") as writer:
            if fd is not None:
                os.pwrite(fd, prefix, 0)
                os.ftruncate(fd, len(prefix) + sum(sizes))
            for k, (a, b) in enumerate(buckets):
                slot = k % 2
                if pending[slot] is not None:
                    pending[slot].result()  # the buffer's previous bucket is on disk
                n = sum(sizes[a:b])
                buf = buffers[slot][:n]
                group.broadcast(buf, root=0).wait()
                total += n
                if fd is not None and n:
                    pending[slot] = writer.submit(_pwrite, fd, buf, len(prefix) + offsets[a])
            for fut in pending:
                if fut is not None:
                    fut.result()
    finally:
        if fd is not None:
            os.close(fd)
    return total


def _pwrite(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = memoryview(buf.numpy()).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
