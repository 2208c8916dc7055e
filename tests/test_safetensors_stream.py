"""A safetensors body read as it arrives (``pr2_serve.core.safetensors_stream``), against the
``safetensors`` library's own encoder and loader. No engine."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from pr2_serve.core.safetensors_stream import Bucket, SafetensorsStream, parse_header


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.weight": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(5, generator=g),
        "d.empty": torch.zeros(0, 4),
        "e.half": torch.randn(3, 3, generator=g).half(),
        "f.big": torch.randn(300, 100, generator=g, dtype=torch.float64),
    }


def _stream(body: bytes, chunk: int, bucket_bytes: int) -> tuple[list, SafetensorsStream]:
    s, out = SafetensorsStream(bucket_bytes), []
    for i in range(0, len(body), chunk):
        out += s.feed(body[i : i + chunk])
    return out, s


@pytest.mark.parametrize("chunk", [1, 5, 8, 100, 4096, 1 << 22])
@pytest.mark.parametrize("bucket_bytes", [1, 1000, 1 << 20])
def test_every_tensor_arrives_exact_in_order_whatever_the_chunking(chunk, bucket_bytes):
    tensors = _tensors()
    body = save(tensors, {"format": "pt"})
    out, s = _stream(body, chunk, bucket_bytes)
    assert s.complete and s.received == len(body) == s.layout.total
    head, buckets = out[0], out[1:]
    assert head == body[: s.layout.data_start]  # the header's bytes, once, first
    assert all(isinstance(b, Bucket) for b in buckets)
    # the buckets' buffers are the body after the header, in order
    assert b"".join(bytes(b.data) for b in buckets) == body[s.layout.data_start :]
    got = [(n, t) for b in buckets for n, t in b.pairs]
    expected = load(body)
    assert [n for n, _ in got] == [e.name for e in s.layout.entries]  # file order
    assert sorted(n for n, _ in got) == sorted(expected)
    for name, t in got:
        ref = expected[name]
        assert t.dtype == ref.dtype and t.shape == ref.shape and torch.equal(t, ref), name
    if bucket_bytes >= 1 << 20:
        assert len(buckets) == 1  # all fit one bucket
    elif bucket_bytes == 1:
        assert all(sum(t.numel() > 0 for _, t in b.pairs) == 1 for b in buckets)


def test_a_bucket_closes_once_it_holds_bucket_bytes():
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(10)}  # 1000 bytes each
    out, _ = _stream(save(tensors), 333, 2500)
    sizes = [[t.numel() * 4 for _, t in b.pairs] for b in out[1:]]
    assert sizes == [[1000] * 3, [1000] * 3, [1000] * 3, [1000]]


def _body(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "header, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "cover 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "start at 4, expected 0"),
        ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, "unknown safetensors dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "not a safetensors"),
        ({"a": {"dtype": "F32"}}, "a: not a safetensors tensor entry"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            "b: data_offsets start at 2, expected 4",
        ),
        ([1, 2], "not a JSON object"),
    ],
)
def test_a_malformed_header_is_refused_naming_the_tensor(header, message):
    with pytest.raises(ValueError, match=message):
        _stream(_body(header, b"\0" * 8), 3, 64)


def test_bytes_past_the_end_and_an_oversized_header_are_refused():
    body = save({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="longer than its safetensors header describes"):
        _stream(body + b"x", 4, 64)
    with pytest.raises(ValueError, match="over the format's limit"):
        SafetensorsStream(64).feed(struct.pack("<Q", 10**9))
    with pytest.raises(ValueError, match="not JSON"):
        _stream(struct.pack("<Q", 3) + b"{{{", 1, 64)


def test_a_short_body_is_not_complete():
    body = save(_tensors())
    _, s = _stream(body[:-1], 64, 1 << 20)
    assert not s.complete and s.received == len(body) - 1
    assert parse_header(body[8 : s.layout.data_start]).total == len(body)
