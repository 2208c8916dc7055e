"""The NCCL receiver (:mod:`pr2_serve.transfer.nccl_receiver`) on the CPU, a gloo group standing
in for vLLM's ``PyNcclCommunicator``: the trainer's packed buckets (vLLM's ``pack_tensors``)
reach the engine's update session in order, bucket by bucket, each checked before it is loaded;
the version's file equals the trainer's tensors; a NaN in the last bucket is refused naming the
tensor after the broadcast is over (the trainer's side completes), nothing of it loaded."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pr2_serve.core.served_checkpoint import NonFiniteWeightsError, check_finite
from pr2_serve.plugin import live_update
from pr2_serve.transfer.protocol import open_group, plan_buckets, tensor_nbytes
from pr2_serve.transfer.trainer_engine import broadcast_buckets

pytestmark = pytest.mark.vllm  # imports vLLM; starts no engine

BUCKET = 4000


class GlooAsNccl:
    """``PyNcclCommunicator.broadcast`` over a gloo group."""

    def __init__(self, group) -> None:
        self.group = group

    def broadcast(self, tensor, src, stream=None) -> None:
        self.group.broadcast(tensor, root=src).wait()


class Session:
    """An update session that records the buckets it loads (checked as the real one)."""

    def __init__(self) -> None:
        self.buckets: list[list[tuple[str, torch.Tensor]]] = []

    def apply(self, pairs) -> None:
        check_finite(pairs)
        self.buckets.append([(n, t.clone()) for n, t in pairs])


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 7, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(64, 33, generator=g),
        "d.weight": torch.randn(2, 3, 4, generator=g),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transfer(sd: dict, path) -> tuple[Session, BaseException | None]:
    """Trainer (rank 0, a thread) broadcasts ``sd``; the receiver (rank 1) takes it into a
    recording session and ``path``; the receiver's error, if any."""
    from pr2_serve.transfer.nccl_receiver import PR2NcclWeightTransferEngine

    port, model, session = free_port(), torch.nn.Linear(1, 1), Session()
    sent: dict = {}

    def trainer() -> None:
        group = open_group("127.0.0.1", port, 0, 2, 30.0)
        sent["bytes"] = broadcast_buckets(group, iter(sd.items()), BUCKET)

    thread = threading.Thread(target=trainer)
    thread.start()
    parallel = SimpleNamespace(rank=0, world_size=1, data_parallel_index=0)
    vllm_config = SimpleNamespace(parallel_config=parallel, model_config=None)
    eng = PR2NcclWeightTransferEngine(
        SimpleNamespace(backend="pr2-nccl"), vllm_config, "cpu", model
    )
    eng.model_update_group = GlooAsNccl(open_group("127.0.0.1", port, 1, 2, 30.0))
    eng.packed, eng.packed_buffer_size_bytes = True, BUCKET
    live_update._SESSIONS[model] = session
    info = {
        "names": list(sd),
        "dtype_names": [str(t.dtype).removeprefix("torch.") for t in sd.values()],
        "shapes": [list(t.shape) for t in sd.values()],
        "path": str(path),
    }
    error = None
    try:
        eng.update_weights(info)
    except BaseException as e:  # returned to the test
        error = e
    thread.join(30)
    assert sent["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())
    return session, error


def test_buckets_reach_the_session_in_order_and_the_file_is_the_version(tmp_path):
    sd = tensors()
    session, error = transfer(sd, tmp_path / "v1.safetensors")
    assert error is None
    sizes = [tensor_nbytes(t.shape, t.dtype) for t in sd.values()]
    names = list(sd)
    assert [[n for n, _ in b] for b in session.buckets] == [
        names[a:b] for a, b in plan_buckets(sizes, BUCKET)
    ]
    got = {n: t for b in session.buckets for n, t in b}
    on_disk = load_file(str(tmp_path / "v1.safetensors"))
    for name, t in sd.items():
        assert torch.equal(got[name], t) and torch.equal(on_disk[name], t), name


def test_a_nan_in_the_last_bucket_is_refused_after_the_broadcast(tmp_path):
    sd = tensors()
    sd["d.weight"].view(-1)[-1] = float("nan")
    session, error = transfer(sd, tmp_path / "v1.safetensors")
    assert isinstance(error, NonFiniteWeightsError)
    assert "d.weight: 1 of 24 values are not finite" in str(error)
    assert all("d.weight" not in [n for n, _ in b] for b in session.buckets)
