"""Weight pushes over a collective (``--weight-transfer gloo|nccl``): trainer rank 0 + every
server's workers in one group, through vLLM's trainer-side factory.

:class:`CollectivePusher` opens the group once (``WeightTransferTrainerFactory.trainer_init``;
each server joins through ``POST /v1/weights/transfer/init`` or gRPC ``TransferInit`` with its
``rank_offset``) and per push broadcasts the state dict while every server's ``POST
/v1/weights/transfer/{version}`` (gRPC ``TransferWeights``) is open (:class:`ServersClient` is
vLLM's ``VLLMWeightSyncClient`` over all of them, ``http://`` or ``grpc://``). A failed push
closes the group; the next push opens a new one.

- ``gloo``: our engine pair (:mod:`pr2_serve.transfer`, :class:`GlooTrainerInitInfo`), CPU
  tensors over TCP; what the CPU build's servers take.
- ``nccl``: vLLM's upstream ``NCCLTrainerWeightTransferEngine`` (``NCCLTrainerInitInfo``,
  packed buckets, tensors on this process's GPU). CUDA only: :func:`check_backend` refuses it
  with a clear message where no GPU is visible. A server takes it only where its engine was
  built with the ``nccl`` weight-transfer backend (CUDA); the CPU build answers 400 naming
  ``gloo``.

vLLM is imported only when a group is opened, so this module loads anywhere.

Example::

    pusher = CollectivePusher(clients, address="127.0.0.1")
    pusher.push({"model.layers.0.mlp.predictor.weight": w, ...}, version=3)
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
from collections.abc import Callable, Mapping, Sequence

import torch

from pr2_serve.client import ServerError
from pr2_serve.transfer.bucket_plan import DEFAULT_BUCKET_BYTES

DEFAULT_TIMEOUT_S = 120.0
BACKENDS = ("gloo", "nccl")

__all__ = [
    "BACKENDS",
    "CollectiveLink",
    "CollectivePusher",
    "GroupNotFormed",
    "ServersClient",
    "check_backend",
]


def check_backend(backend: str, cuda_available: bool | None = None) -> None:
    """Refuse a ``--weight-transfer`` this process cannot send with: ``nccl`` broadcasts from
    a GPU (``http``/``grpc``/``gloo`` run anywhere)."""
    if backend != "nccl":
        return
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise RuntimeError(
            "--weight-transfer nccl needs CUDA: vLLM's NCCL engine broadcasts from this "
            "trainer's GPU to the servers' GPUs, and no GPU is visible here (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False). Use --weight-transfer "
            "gloo (CPU, TCP) or http/grpc."
        )


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

    def init_as(self, backend: str):
        """The client as the trainer engine of ``backend`` calls it: the upstream ``nccl``
        engine sends vLLM's worker payload, which travels as our init request."""
        if backend == "gloo":
            return self
        return _NcclInit(self)

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


class GroupNotFormed(RuntimeError):
    """The trainer and the servers did not all join the transfer group in time."""


class _NcclInit:
    """``ServersClient`` with vLLM's NCCL worker init payload mapped onto our init request
    (``backend: nccl``; ``packed_buffer_size_bytes`` is the bucket size)."""

    def __init__(self, inner: ServersClient) -> None:
        self.inner = inner

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.inner.init_weight_transfer_engine(
            {
                "backend": "nccl",
                "master_address": init_info["master_address"],
                "master_port": init_info["master_port"],
                "world_size": init_info["world_size"],
                "bucket_bytes": init_info["packed_buffer_size_bytes"],
            }
        )

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class CollectivePusher:
    """Push state dicts to every server over one group (see module docstring)."""

    def __init__(
        self,
        clients: Sequence,
        address: str = "127.0.0.1",
        port: int = 0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        workers: Sequence[int] | None = None,
        backend: str = "gloo",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"collective weight transfer is one of {BACKENDS}, not {backend!r}")
        check_backend(backend)
        self.backend = backend
        self.client = ServersClient(clients, workers)
        self.address, self.port = address, port
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.source = None
        self.engine = None

    def _open(self) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from pr2_serve.transfer import register
        from pr2_serve.transfer.trainer_engine import StateDictSource

        register()
        port = self.port or _free_port(self.address)
        common = {"master_address": self.address, "master_port": port, "rank": 0}
        common["world_size"] = self.client.world_size
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(**common, packed_buffer_size_bytes=self.bucket_bytes)
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            from pr2_serve.transfer.protocol import GlooTrainerInitInfo

            info = GlooTrainerInitInfo(
                **common, bucket_bytes=self.bucket_bytes, timeout_s=self.timeout_s
            )
            device = torch.device("cpu")
        self.source = StateDictSource({}, device=device)
        try:
            self.engine = WeightTransferTrainerFactory.trainer_init(
                info, client=self.client.init_as(self.backend), source=self.source
            )
        except ServerError:
            raise  # a server's refusal says why
        except Exception as e:
            raise GroupNotFormed(
                f"the {self.backend} transfer group did not form: world_size {info.world_size} "
                f"= this trainer (rank 0) + {self.client.workers} server worker(s), "
                f"rendezvous {self.address}:{port}, timeout {self.timeout_s:g} s. Check that "
                "every server counts as many workers as it has and reaches that address. "
                f"({type(e).__name__}: {e})"
            ) from e

    def push(self, tensors: Mapping[str, torch.Tensor], version: int) -> list[dict]:
        """Send ``tensors`` (HF names) as ``version`` to every server; their results."""
        if self.engine is None:
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


class CollectiveLink:
    """The run's transfer group to the live servers (``--weight-transfer gloo|nccl``): opened
    at the first push, opened again when the live servers changed (a dropped server would never
    join), closed with the trainer (:meth:`close`)."""

    def __init__(self, address: str, backend: str) -> None:
        self.address, self.backend = address, backend
        self.pusher: CollectivePusher | None = None

    def sender(self, tensors: dict) -> Callable[[Sequence, int], list[dict]]:
        """What the server pool calls to push ``tensors`` (checkpoint names) to its live
        servers' clients as ``version``."""

        def send(clients: Sequence, version: int) -> list[dict]:
            if self.pusher is None or self.pusher.client.clients != list(clients):
                self.close()
                self.pusher = CollectivePusher(clients, address=self.address, backend=self.backend)
            return self.pusher.push(tensors, version)

        return send

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]
