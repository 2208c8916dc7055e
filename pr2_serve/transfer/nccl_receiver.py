"""``PR2NcclWeightTransferEngine``: vLLM's NCCL worker engine on the live update path.

The trainer side is vLLM's own ``NCCLTrainerWeightTransferEngine`` with packed buckets
(``packed=True``: ``pack_tensors``' layout, cut at ``packed_buffer_size_bytes``); the group is
upstream's (``worker_init_process_group``, a ``PyNcclCommunicator``). What differs from the
upstream receiver is what happens to a bucket: it arrives in a GPU buffer of its own, is checked
there (every value finite, ``torch.isfinite`` of its sum per chunk, naming each bad tensor) and
loaded by the engine's update session (:mod:`pr2_serve.plugin.live_update`, which keeps the
undo), exactly as a gloo bucket (:func:`pr2_serve.transfer.gloo_engine.receive_and_apply`; the
only difference is the transport); the first worker also copies it to the host and writes it
into the version's file. The session, not this engine, runs the layerwise reload, so
``start_weight_update`` / ``finish_weight_update`` do nothing here.

By design on CUDA (no GPU has run it here); its receive loop is tested on the CPU with a gloo
group standing in for the communicator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
)

from pr2_serve.plugin.live_update import live_session
from pr2_serve.transfer import NCCL_BACKEND
from pr2_serve.transfer.gloo_engine import receive_and_apply, worker_rank
from pr2_serve.transfer.protocol import GlooUpdateInfo

__all__ = ["NCCL_BACKEND", "PR2NcclUpdateInfo", "PR2NcclWeightTransferEngine", "nccl_recv"]


@dataclass
class PR2NcclUpdateInfo(NCCLWeightTransferUpdateInfo):
    """Upstream's update info plus ``path``: where the first worker writes the version."""

    path: str | None = None


def nccl_recv(group):
    """``recv(buffer)`` over a ``PyNcclCommunicator`` (or a stand-in with its ``broadcast``):
    the buffer is complete when it returns."""

    def recv(buf: torch.Tensor) -> None:
        stream = torch.cuda.current_stream() if buf.is_cuda else None
        group.broadcast(buf, src=0, stream=stream)
        if stream is not None:
            stream.synchronize()  # the bucket is read on another thread

    return recv


class PR2NcclWeightTransferEngine(NCCLWeightTransferEngine):
    """See module docstring."""

    update_info_cls = PR2NcclUpdateInfo

    def start_weight_update(self) -> None:
        pass  # the engine's update session runs the layerwise reload

    def finish_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: PR2NcclUpdateInfo) -> None:
        if self.model_update_group is None:
            raise RuntimeError("NCCL weight transfer not initialized: init it first")
        if not self.packed:
            raise ValueError("the trainer must send packed buckets (NCCLTrainerInitInfo.packed)")
        info = GlooUpdateInfo(
            names=update_info.names,
            dtype_names=update_info.dtype_names,
            shapes=update_info.shapes,
        )
        first = worker_rank(self.parallel_config) == 0
        path = update_info.path if first else None
        session = live_session(self.model)
        apply = None if session is None else session.apply
        recv = nccl_recv(self.model_update_group)
        receive_and_apply(recv, info, self.packed_buffer_size_bytes, path, apply, self.device)
