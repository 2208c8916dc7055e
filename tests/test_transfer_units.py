"""The gloo weight-transfer engines (``pr2_serve.transfer``), both ends in this process over a
real gloo group on loopback: registered with vLLM's factories; the trainer engine made through
``WeightTransferTrainerFactory``; the worker engine writes a safetensors file equal to the
trainer's tensors, bucket boundaries as vLLM cuts them; a refused update fails fast and
closes the group."""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from vllm.distributed.weight_transfer.factory import (
    WeightTransferEngineFactory,
    WeightTransferTrainerFactory,
)
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

from pr2_serve.transfer import register
from pr2_serve.transfer.protocol import (
    GlooInitInfo,
    GlooTrainerInitInfo,
    GlooUpdateInfo,
    plan_buckets,
    safetensors_layout,
)
from pr2_serve.transfer.trainer_engine import StateDictSource

pytestmark = pytest.mark.vllm  # needs vLLM (imports it; starts no engine)

register()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_engine():
    vllm_config = SimpleNamespace(
        parallel_config=SimpleNamespace(rank=0, world_size=1, data_parallel_index=0),
        model_config=None,
    )
    config = SimpleNamespace(backend="gloo")
    return WeightTransferEngineFactory.create_engine(config, vllm_config, "cpu", None)


class LocalClient:
    """The control plane, in process: drives a worker engine, writing to ``path``."""

    def __init__(self, path, refuse: str | None = None) -> None:
        self.engine, self.path, self.refuse, self.calls = worker_engine(), str(path), refuse, []

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_transfer_engine(self.engine.parse_init_info(init_info))

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict) -> None:
        if self.refuse:
            raise ValueError(self.refuse)
        self.engine.update_weights({**update_info, "path": self.path})
        self.calls.append("update")

    def finish_weight_update(self, weight_version=None) -> None:
        self.calls.append("finish")


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 7, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(64, 33, generator=g).to(torch.float16),
        "empty": torch.zeros(0, 4),
        "d.weight": torch.randn(2, 3, 4, generator=g),
    }


def trainer_info(bucket_bytes: int, timeout_s: float = 30.0) -> GlooTrainerInitInfo:
    return GlooTrainerInitInfo(
        master_address="127.0.0.1",
        master_port=free_port(),
        world_size=2,
        bucket_bytes=bucket_bytes,
        timeout_s=timeout_s,
        rank=0,
    )


def test_registered_with_vllm_factories():
    assert "gloo" in WeightTransferEngineFactory._registry
    assert "gloo" in WeightTransferTrainerFactory._registry
    register()  # idempotent


@pytest.mark.parametrize("bucket_bytes", [1, 4000, 1 << 20])
def test_transfer_writes_the_tensors_to_a_safetensors_file(tmp_path, bucket_bytes):
    sd = tensors()
    client = LocalClient(tmp_path / "v1.safetensors")
    eng = WeightTransferTrainerFactory.trainer_init(
        trainer_info(bucket_bytes), client=client, source=StateDictSource(sd)
    )
    try:
        eng.send_weights()
        eng.send_weights()  # the group serves again
    finally:
        eng.shutdown()
        client.engine.shutdown()
    assert client.calls == ["start", "update", "finish"] * 2
    got = load_file(str(client.path))
    assert list(got) == list(sd) or set(got) == set(sd)
    for name, t in sd.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_bucket_plan_is_vllms_pack_rule():
    sd = tensors()
    info = GlooUpdateInfo(
        names=list(sd),
        dtype_names=[str(t.dtype).removeprefix("torch.") for t in sd.values()],
        shapes=[list(t.shape) for t in sd.values()],
    )
    for bucket in [1, 100, 4000, 8400, 1 << 20]:
        it = iter(sd.items())
        cut = []
        while (chunk := pack_tensors(it, lambda item: item[1], bucket)) is not None:
            cut.append(len(chunk.names))
        assert [b - a for a, b in plan_buckets(info.nbytes(), bucket)] == cut, bucket
    prefix, offsets = safetensors_layout(info)
    (n,) = struct.unpack("<Q", prefix[:8])
    assert n == len(prefix) - 8 and n % 8 == 0
    assert offsets == [0, *list(torch.tensor(info.nbytes()).cumsum(0)[:-1].tolist())]


def test_bad_update_info_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="differ in length"):
        GlooUpdateInfo(names=["a"], dtype_names=[], shapes=[[1]])
    with pytest.raises(ValueError, match="unknown dtype"):
        GlooUpdateInfo(names=["a"], dtype_names=["float99"], shapes=[[1]])
    with pytest.raises(ValueError, match="named twice"):
        GlooUpdateInfo(names=["a", "a"], dtype_names=["float32"] * 2, shapes=[[1]] * 2)
    with pytest.raises(ValueError, match="rank_offset"):
        GlooInitInfo(master_address="x", master_port=1, rank_offset=2, world_size=2)


def test_refused_update_fails_fast_and_closes_the_group(tmp_path):
    client = LocalClient(tmp_path / "v1.safetensors", refuse="unknown tensor name 'x'")
    sd = {"x": torch.randn(1000, 1000)}  # larger than the socket buffers: the send blocks
    eng = WeightTransferTrainerFactory.trainer_init(
        trainer_info(1 << 20, timeout_s=600), client=client, source=StateDictSource(sd)
    )
    try:
        with pytest.raises(ValueError, match="unknown tensor name"):
            eng.send_weights()
        assert eng.group is None
    finally:
        eng.shutdown()
        client.engine.shutdown()
    assert not (tmp_path / "v1.safetensors").exists()


class Recorder:
    """A server client that records its transfer calls."""

    def __init__(self) -> None:
        self.inits: list[dict] = []

    def transfer_init(self, body: dict) -> dict:
        self.inits.append(body)
        return {}


def test_nccl_is_vllms_engine_and_refused_without_cuda(tmp_path):
    """``--weight-transfer nccl``: a choice; without CUDA refused at once (the trainer, before
    any server is called; the pusher) with a message that says why and what to use; with it the
    upstream ``NCCLTrainerWeightTransferEngine`` whose worker payload travels as our init."""
    from vllm.distributed.weight_transfer.nccl_common import (
        NCCLWeightTransferInitInfo,
        worker_init_payload,
    )
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from trainer.rollouts.collective_push import CollectivePusher, ServersClient, check_backend
    from trainer.run.config import TrainConfig
    from trainer.run.loop import Trainer

    for ok in ("http", "grpc", "gloo"):
        check_backend(ok, cuda_available=False)
    check_backend("nccl", cuda_available=True)
    with pytest.raises(RuntimeError, match=r"nccl needs CUDA.*Use --weight-transfer gloo"):
        check_backend("nccl", cuda_available=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nccl needs CUDA"):
            CollectivePusher([Recorder()], backend="nccl")
        cfg = TrainConfig(servers=["http://127.0.0.1:9"], weight_transfer="nccl")
        with pytest.raises(RuntimeError, match="nccl needs CUDA"):
            Trainer(cfg, log=lambda _: None)  # (port 9: nothing is called)
    assert WeightTransferTrainerFactory._registry["nccl"]() is NCCLTrainerWeightTransferEngine
    servers = [Recorder(), Recorder()]
    worker = NCCLWeightTransferInitInfo(
        master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=3, packed=True
    )
    ServersClient(servers).init_as("nccl").init_weight_transfer_engine(worker_init_payload(worker))
    assert [s.inits for s in servers] == [
        [
            {
                "backend": "nccl",
                "master_address": "10.0.0.1",
                "master_port": 29600,
                "world_size": 3,
                "bucket_bytes": worker.packed_buffer_size_bytes,
                "rank_offset": r,
            }
        ]
        for r in (1, 2)
    ]


def test_grpc_transfer_init_is_the_http_body():
    """gRPC ``TransferInit``: the same request model as the HTTP route (0/"" the defaults),
    so both validate alike; a bad field is a 422 naming it (INVALID_ARGUMENT)."""
    from pr2_serve.api.grpc_server import _validated, pb2, transfer_init_fields
    from pr2_serve.service.collective_receive import TransferInitRequest
    from pr2_serve.service.errors import ApiError

    msg = pb2.TransferInitRequest(master_address="h", master_port=5, world_size=3, rank_offset=2)
    req = _validated(TransferInitRequest, transfer_init_fields(msg))
    assert req == TransferInitRequest(
        master_address="h", master_port=5, world_size=3, rank_offset=2
    )
    msg.timeout_s, msg.backend = 7.5, "nccl"
    req = _validated(TransferInitRequest, transfer_init_fields(msg))
    assert (req.timeout_s, req.backend) == (7.5, "nccl")
    msg.master_port = 0
    with pytest.raises(ApiError) as e:
        _validated(TransferInitRequest, transfer_init_fields(msg))
    assert (e.value.status, e.value.field) == (422, "master_port")


def test_grpc_transfer_refusals_have_the_http_routes_codes():
    """The gRPC methods call the service as the HTTP routes do; its refusals map to the codes
    of their HTTP statuses (403 disabled: PERMISSION_DENIED; 401: UNAUTHENTICATED; 400:
    INVALID_ARGUMENT), the key checked first."""
    import asyncio

    import grpc

    from pr2_serve.api.grpc_server import RolloutServicer, pb2
    from pr2_serve.service.collective_receive import TransferControl
    from pr2_serve.service.errors import ApiError

    class Service:  # the real TransferControl (disabled); the key check as the service's
        transfer = TransferControl(engine=None, enabled=False)
        metrics = SimpleNamespace(
            errors=SimpleNamespace(labels=lambda **_: SimpleNamespace(inc=int))
        )

        def check_auth(self, authorization):
            if authorization != "Bearer k":
                raise ApiError(401, "unauthenticated", "missing or wrong bearer token")

        async def transfer_init(self, req):
            return self.transfer.init(req)

        async def transfer_weights(self, version, req, protocol):
            return self.transfer.check(req)

        @property
        def updates(self):  # (the real service holds its weight updates apart)
            return self

    class Context:
        def __init__(self, key):
            self.meta = [("authorization", f"Bearer {key}")]

        def invocation_metadata(self):
            return self.meta

        async def abort(self, code, message, trailing_metadata=()):
            raise RuntimeError(code, message)

    def code(call, msg, key="k"):
        with pytest.raises(RuntimeError) as e:
            asyncio.run(call(msg, Context(key)))
        return e.value.args[0]

    servicer = RolloutServicer(Service())
    init = pb2.TransferInitRequest(master_address="h", master_port=5, world_size=2, rank_offset=1)
    weights = pb2.TransferWeightsRequest(version=3, names=["a"], dtypes=["float32"])
    weights.shapes.add(dims=[1])
    assert code(servicer.TransferInit, init) == grpc.StatusCode.PERMISSION_DENIED
    assert code(servicer.TransferWeights, weights) == grpc.StatusCode.PERMISSION_DENIED
    assert code(servicer.TransferInit, init, key="x") == grpc.StatusCode.UNAUTHENTICATED
    assert code(servicer.TransferWeights, weights, key="x") == grpc.StatusCode.UNAUTHENTICATED
    weights.version = 0
    assert code(servicer.TransferWeights, weights) == grpc.StatusCode.INVALID_ARGUMENT
    init.master_port = 0
    assert code(servicer.TransferInit, init) == grpc.StatusCode.INVALID_ARGUMENT


class HungInit(LocalClient):
    """A server that accepted the transfer-init call and never answers it (a hung process)."""

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        threading.Event().wait(600)


@pytest.mark.timeout(60)
def test_a_group_with_a_hung_server_fails_at_its_timeout(tmp_path):
    """The group does not form within ``timeout_s``: the trainer fails then (the pool then
    pushes per server and drops the hung one), not when the hung init call would end."""
    client = HungInit(tmp_path / "v1.safetensors")
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - gloo's own error type for a missing rank
        WeightTransferTrainerFactory.trainer_init(
            trainer_info(1 << 20, timeout_s=2), client=client, source=StateDictSource({})
        )
    assert time.monotonic() - t0 < 20
    client.engine.shutdown()


def test_a_slow_disk_holds_the_receive_back(tmp_path):
    """Each bucket is written on the receiving thread as it arrives: a disk slower than the
    wire holds the receive back, buckets do not pile up in memory waiting to be written (at
    most two exist: the one received, the one applied)."""
    from pr2_serve.transfer import gloo_engine

    n, write = 10, gloo_engine._pwrite
    info = GlooUpdateInfo(
        names=[f"t{i}" for i in range(n)], dtype_names=["uint8"] * n, shapes=[[8]] * n
    )
    fill, pending, most = iter(range(n)), {}, [0]  # buffer -> what it still waits for

    def done(ptr, what):
        pending[ptr].discard(what)
        if not pending[ptr]:
            del pending[ptr]

    def recv(buf):
        buf.fill_(next(fill))
        pending[buf.data_ptr()] = {"apply", "write"}
        most[0] = max(most[0], len(pending))

    def slow(fd, buf, offset):
        time.sleep(0.05)
        write(fd, buf, offset)
        done(buf.data_ptr(), "write")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gloo_engine, "_pwrite", slow)
        apply = lambda pairs: done(pairs[0][1].data_ptr(), "apply")  # noqa: E731
        gloo_engine.receive_and_apply(recv, info, 1, tmp_path / "f", apply)
    assert most[0] <= 2
    data = load_file(str(tmp_path / "f"))
    assert all(torch.equal(data[f"t{i}"], torch.full((8,), i, dtype=torch.uint8)) for i in range(n))


def test_a_failed_write_is_raised_once_every_bucket_is_received(tmp_path):
    """A write that fails (a full disk) stops the writing, not the receiving (the trainer's
    broadcast stays in step), and is raised at the end."""
    import errno

    from pr2_serve.transfer import gloo_engine

    info = GlooUpdateInfo(names=["a", "b", "c"], dtype_names=["uint8"] * 3, shapes=[[8]] * 3)
    received, writes = [], []

    def full(fd, buf, offset):
        writes.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gloo_engine, "_pwrite", full)
        with pytest.raises(OSError, match="No space"):
            gloo_engine.receive_and_apply(received.append, info, 1, tmp_path / "f", None)
    assert len(received) == 3 and len(writes) == 1


def test_the_transfer_writer_writes_over_a_longer_file_and_cuts_it(tmp_path):
    """The gloo file writer writes over an existing file (a spare, ``WeightStore.reuse_spare``)
    without truncating it first, and leaves exactly the version's bytes."""
    from pr2_serve.transfer import gloo_engine

    path = tmp_path / "f"
    path.write_bytes(b"\xff" * 100)
    inode = path.stat().st_ino
    writer = gloo_engine._Writer(path, b"head", 8)
    writer.put(torch.arange(8, dtype=torch.uint8), 4)
    writer.close()
    assert (path.stat().st_ino, path.read_bytes()) == (inode, b"head" + bytes(range(8)))


def test_a_buffer_is_received_into_again_only_once_nothing_holds_it(tmp_path, monkeypatch):
    """Two buffers serve a whole transfer when each bucket is copied out as it loads; a bucket
    whose views the loader keeps (a layer not yet whole) keeps its buffer: never overwritten."""
    from pr2_serve.core import reused_buffers
    from pr2_serve.transfer import gloo_engine

    n, mapped = 10, reused_buffers.mapped_bytes
    info = GlooUpdateInfo(
        names=[f"t{i}" for i in range(n)], dtype_names=["uint8"] * n, shapes=[[8]] * n
    )

    def run(apply) -> int:
        fill, made = iter(range(n)), []
        monkeypatch.setattr(reused_buffers, "mapped_bytes", lambda k: made.append(k) or mapped(k))
        gloo_engine.receive_and_apply(lambda buf: buf.fill_(next(fill)), info, 1, None, apply)
        monkeypatch.setattr(reused_buffers, "mapped_bytes", mapped)
        return len(made)

    assert run(lambda pairs: [t.clone() for _, t in pairs]) == 2
    kept = []
    assert run(lambda pairs: kept.extend(pairs) if len(kept) < 3 else None) == 3 + 2
    assert [int(t[0]) for _, t in kept] == [0, 1, 2]  # still what was received into them
