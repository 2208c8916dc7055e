"""Bucket buffers given out again once nothing holds them, in mappings of their own
(``pr2_serve.core.reused_buffers``), and a streamed upload's buckets received into them
(``pr2_serve.core.safetensors_stream``). Pure torch, no engine."""

from __future__ import annotations

import torch
from safetensors.torch import save

from pr2_serve.core import reused_buffers
from pr2_serve.core.reused_buffers import ReusedBuffers, mapped_bytes
from pr2_serve.core.safetensors_stream import Bucket, SafetensorsStream


def _mapped(address: int) -> bool:
    """Whether ``address`` lies in a mapping of this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def test_a_buffer_s_memory_goes_back_to_the_system_once_nothing_holds_it():
    base = mapped_bytes(8 << 20)
    view, address = base[100:200], base.data_ptr()
    del base
    assert _mapped(address) and int(view.sum()) == 0  # zeroed, kept alive by its view
    del view
    assert not _mapped(address)  # unmapped: not a heap block kept by the allocator


def test_a_buffer_is_given_out_again_only_once_no_view_of_it_is_left():
    buffers = ReusedBuffers()
    a = buffers.take(100)
    view = a[:10]
    b = buffers.take(100)
    assert b is not a  # a view of ``a`` is alive
    del view
    assert buffers.take(50) is a  # taken back by itself: nothing holds it any more


def test_from_the_last_bucket_on_no_buffer_is_kept():
    buffers = ReusedBuffers()
    a = buffers.take(1 << 20)
    in_use, address = a[:10], a.data_ptr()
    del a
    b = buffers.take(1 << 20)
    c = buffers.take(1 << 20, last=True)
    assert c is b and buffers.free == [] and buffers.lent == []
    del in_use  # ``a`` is not kept: its memory goes back
    assert not _mapped(address)


def test_an_upload_s_buckets_are_received_into_two_buffers_and_let_go_at_the_end(monkeypatch):
    """Each bucket handed on and dropped before the next is asked for (what the engine and
    the writer do): two buffers serve the whole body, and once the last bucket is begun the
    buffer not in use goes back to the system."""
    made = []
    monkeypatch.setattr(
        reused_buffers, "mapped_bytes", lambda n: made.append(m := mapped_bytes(n)) or m
    )
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(12)}  # 1 KiB each
    body, got = save(tensors), {}
    stream = SafetensorsStream(1024)
    for i in range(0, len(body), 300):
        for piece in stream.pieces(body[i : i + 300]):
            if isinstance(piece, Bucket):
                got.update((n, t.clone()) for n, t in piece.pairs)
            del piece
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert 1 <= len(made) <= 2  # 12 buckets
    addresses = [b.data_ptr() for b in made]
    made.clear()
    assert stream.complete and not any(_mapped(a) for a in addresses)
