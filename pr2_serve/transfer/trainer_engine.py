"""``GlooTrainerWeightTransferEngine``: the trainer side of a gloo transfer, and
``StateDictSource``, a ``WeightSource`` over a ``{name: tensor}`` dict.

Made by ``WeightTransferTrainerFactory.trainer_init(GlooTrainerInitInfo(...), client=...,
source=...)``, as the upstream ``nccl`` trainer engine: rank 0 opens the group (hosting the
TCPStore) while ``client.init_weight_transfer_engine`` makes the servers' workers join it;
``send_weights`` calls ``client.update_weights`` (the servers receive) while it broadcasts the
packed buckets (vLLM's ``pack_tensors``). If the client call fails first (a server refused the
update), the group is closed and the error raised at once rather than after the timeout; a
failed transfer leaves the group unusable, so callers init again before the next one.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Self

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
)
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

from pr2_serve.transfer.protocol import GlooTrainerInitInfo, close_group, open_group

__all__ = ["GlooTrainerWeightTransferEngine", "StateDictSource", "broadcast_buckets"]

SERVER_REASON_WAIT_S = 10.0  # after a broken broadcast, how long to wait for the servers' reason


class StateDictSource(WeightSource):
    """The tensors of a ``{name: tensor}`` dict, in its order, on ``device`` (CPU for gloo,
    the trainer's GPU for vLLM's ``nccl`` engine)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device=None) -> None:
        self.tensors = tensors
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.tensors.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self.tensors.items():
            yield name, t.detach().to(self.device)


def broadcast_buckets(group, pairs: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> int:
    """Broadcast ``pairs`` from rank 0 in packed buckets, each packed while the one before is
    on the wire; the bytes sent."""
    total, sending = 0, None
    with warnings.catch_warnings():  # a tensor larger than a bucket travels alone: expected
        warnings.filterwarnings("ignore", message="Tensor .* exceeds buffer_size_bytes")
        while (chunk := pack_tensors(pairs, lambda item: item[1], bucket_bytes)) is not None:
            if sending is not None:
                sending[0].wait()
            sending = (group.broadcast(chunk.packed_tensor, root=0), chunk)  # kept until sent
            total += chunk.packed_tensor.numel()
    if sending is not None:
        sending[0].wait()
    return total


def _in_daemon_thread(fn, *args) -> cf.Future:
    """``fn(*args)`` in a daemon thread: a hung server's call (the servers' side of forming a
    group) must hold neither the trainer past the group's timeout nor its exit."""
    future: cf.Future = cf.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to the caller
            future.set_exception(e)

    threading.Thread(target=run, name="pr2-transfer-init", daemon=True).start()
    return future


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer rank 0 of a gloo transfer group (see module docstring)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender=True, bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None

    @classmethod
    def trainer_init(
        cls,
        init_info: GlooTrainerInitInfo,
        *,
        client: VLLMWeightSyncClient,
        source: WeightSource | None = None,
    ) -> Self:
        if source is None:
            raise ValueError("the gloo trainer engine needs a WeightSource")
        engine = cls(
            client=client,
            source=source,
            is_sender=init_info.is_sender,
            bucket_bytes=init_info.bucket_bytes,
        )
        if not engine.is_sender:
            return engine
        worker_info = {
            "master_address": init_info.master_address,
            "master_port": init_info.master_port,
            "rank_offset": 1,
            "world_size": init_info.world_size,
            "bucket_bytes": init_info.bucket_bytes,
            "timeout_s": init_info.timeout_s,
        }
        future = _in_daemon_thread(client.init_weight_transfer_engine, worker_info)
        try:
            engine.group = open_group(
                init_info.master_address,
                init_info.master_port,
                0,
                init_info.world_size,
                init_info.timeout_s,
            )
        except BaseException:
            if future.done() and future.exception() is not None:
                raise future.exception() from None  # the servers' reason comes first
            raise
        future.result()
        return engine

    def send_weights(self) -> None:
        source = self.source
        meta = source.metadata()
        if not self.is_sender:
            for _ in source:
                pass
            return
        update_info = {
            "names": [m.name for m in meta],
            "dtype_names": [str(m.dtype).removeprefix("torch.") for m in meta],
            "shapes": [list(m.shape) for m in meta],
        }
        self.client.start_weight_update()
        exe = cf.ThreadPoolExecutor(max_workers=2)
        try:
            update = exe.submit(self.client.update_weights, update_info)
            send = exe.submit(broadcast_buckets, self.group, iter(source), self.bucket_bytes)
            cf.wait([update, send], return_when=cf.FIRST_EXCEPTION)
            if send.done() and send.exception() is not None:
                # a server left the group: its answer says why (a refusal, a timeout)
                cf.wait([update], timeout=SERVER_REASON_WAIT_S)
            if update.done() and update.exception() is not None:
                self.shutdown()  # the servers will not receive: stop the broadcast
                raise update.exception()
            send.result()
            update.result()
        except BaseException:
            self.shutdown()
            raise
        finally:
            exe.shutdown(wait=False)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            close_group(group)
