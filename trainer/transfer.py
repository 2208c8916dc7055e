"""Weight pushes over a collective (``--weight-transfer gloo``): trainer rank 0 + every server's
workers in one gloo group, through vLLM's trainer-side factory.

:class:`CollectivePusher` opens the group once (``WeightTransferTrainerFactory.trainer_init``
with :class:`~pr2_serve.transfer.wire.GlooTrainerInitInfo`; each server joins through ``POST
/v1/weights/transfer/init`` with its ``rank_offset``) and per push broadcasts the state dict
while every server's ``POST /v1/weights/transfer/{version}`` is open
(:class:`ServersClient` is vLLM's ``VLLMWeightSyncClient`` over all of them). A failed push
closes the group; the next push opens a new one. ``nccl`` (CUDA) is the upstream engine by
design: the servers here take ``gloo``.

Example::

    pusher = CollectivePusher(clients, address="127.0.0.1")
    pusher.push({"model.layers.0.mlp.predictor.weight": w, ...}, version=3)
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
from collections.abc import Mapping, Sequence

import torch

from pr2_serve.transfer import register
from pr2_serve.transfer.trainer import StateDictSource
from pr2_serve.transfer.wire import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S, GlooTrainerInitInfo

__all__ = ["CollectivePusher", "ServersClient", "collective_push"]


class ServersClient:
    """vLLM's ``VLLMWeightSyncClient`` over several servers (each one worker unless told):
    every call goes to all of them at once; ``version`` is set before each transfer."""

    def __init__(self, clients: Sequence, workers: Sequence[int] | None = None) -> None:
        self.clients = list(clients)
        self.workers = list(workers or [1] * len(self.clients))
        self.version: int | None = None
        self.results: list[dict] = []
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, len(self.clients)))

    @property
    def world_size(self) -> int:
        return 1 + sum(self.workers)

    def _all(self, fn) -> list:
        futures = [self._pool.submit(fn, i, c) for i, c in enumerate(self.clients)]
        return [f.result() for f in futures]

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offsets = [1 + sum(self.workers[:i]) for i in range(len(self.clients))]
        self._all(lambda i, c: c.transfer_init({**init_info, "rank_offset": offsets[i]}))

    def start_weight_update(self) -> None:
        pass  # one server call per version does start/update/finish (and applies)

    def update_weights(self, update_info: dict) -> None:
        body = {
            "names": update_info["names"],
            "dtypes": update_info["dtype_names"],
            "shapes": update_info["shapes"],
        }
        self.results = self._all(lambda i, c: c.transfer_weights(body, self.version))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class CollectivePusher:
    """Push state dicts to every server over one gloo group (see module docstring)."""

    def __init__(
        self,
        clients: Sequence,
        address: str = "127.0.0.1",
        port: int = 0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        workers: Sequence[int] | None = None,
    ) -> None:
        register()
        self.client = ServersClient(clients, workers)
        self.address, self.port = address, port
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.source = StateDictSource({})
        self.engine = None

    def _open(self) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        info = GlooTrainerInitInfo(
            master_address=self.address,
            master_port=self.port or _free_port(self.address),
            world_size=self.client.world_size,
            bucket_bytes=self.bucket_bytes,
            timeout_s=self.timeout_s,
            rank=0,
        )
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=self.client, source=self.source
        )

    def push(self, tensors: Mapping[str, torch.Tensor], version: int) -> list[dict]:
        """Send ``tensors`` (HF names) as ``version`` to every server; their results."""
        if self.engine is None or self.engine.group is None:
            self._open()
        self.source.tensors = tensors
        self.client.version = version
        try:
            self.engine.send_weights()
        except BaseException:
            self.close_group()
            raise
        return self.client.results

    def close_group(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def close(self) -> None:
        self.close_group()
        self.client.close()


def collective_push(trainer, tensors: dict, version: int) -> list[dict]:
    """``Trainer.push`` with ``--weight-transfer gloo``: the checkpoint-named tensors to every
    server over one group (opened on the first push, kept on the trainer)."""
    pusher = getattr(trainer, "_collective", None)
    if pusher is None:
        bad = [a for a in trainer.cfg.servers if not a.startswith("http")]
        if bad:
            raise ValueError(f"--weight-transfer gloo needs http:// servers (control plane): {bad}")
        pusher = CollectivePusher(trainer.clients, address=trainer.cfg.weight_transfer_address)
        trainer._collective = pusher
    return pusher.push(tensors, version)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]
