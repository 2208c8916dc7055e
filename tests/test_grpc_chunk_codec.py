"""``UpdateWeights`` chunks encoded and decoded without protobuf's copies
(``api.chunk_codec``): the same bytes on the wire as the protobuf runtime's, a received chunk a
view of gRPC's bytes, anything else parsed by the runtime."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from pr2_serve.api.chunk_codec import decode_upload, encode_upload
from pr2_serve.api.proto import load

pb2, _ = load()
SIZES = [0, 1, 127, 128, 300, 16383, 16384, (2 << 20) + 5]


@pytest.mark.parametrize("size", SIZES)
def test_a_chunk_encodes_as_the_protobuf_runtime_does(size):
    data = bytes(i % 251 for i in range(size))
    want = pb2.UpdateWeightsRequest(chunk=data).SerializeToString()
    assert encode_upload(data) == want
    assert encode_upload(memoryview(data)) == want
    assert encode_upload(bytearray(data)) == want


def test_a_tensor_view_encodes_its_bytes():
    t = torch.arange(1000, dtype=torch.float32)
    view = memoryview(t.numpy()).cast("B")
    want = pb2.UpdateWeightsRequest(chunk=t.numpy().tobytes()).SerializeToString()
    assert encode_upload(view) == want


def test_the_header_is_serialized_by_the_runtime():
    header = pb2.UpdateWeightsRequest(
        header=pb2.UpdateWeightsHeader(version=3, total_size=10, xxh128="ab")
    )
    assert encode_upload(header) == header.SerializeToString()
    assert decode_upload(header.SerializeToString()) == header


@pytest.mark.parametrize("size", SIZES)
def test_a_chunk_decodes_to_a_view_of_the_received_bytes(size):
    data = bytes(i % 253 for i in range(size))
    raw = pb2.UpdateWeightsRequest(chunk=data).SerializeToString()
    got = decode_upload(raw)
    assert isinstance(got, memoryview) and got.obj is raw  # no copy
    assert bytes(got) == data


def test_anything_but_one_chunk_field_is_parsed_by_the_runtime():
    chunk = pb2.UpdateWeightsRequest(chunk=b"abc").SerializeToString()
    header = pb2.UpdateWeightsRequest(header=pb2.UpdateWeightsHeader(version=4))
    # a chunk then a header: one message whose oneof holds the last (protobuf's rule)
    got = decode_upload(chunk + header.SerializeToString())
    assert not isinstance(got, memoryview) and got.WhichOneof("part") == "header"
    # two chunk fields: the runtime's answer (the last), not the first one's bytes
    got = decode_upload(chunk + pb2.UpdateWeightsRequest(chunk=b"xy").SerializeToString())
    assert not isinstance(got, memoryview) and got.chunk == b"xy"
    # an empty message parses to no part at all
    assert decode_upload(b"").WhichOneof("part") is None


@pytest.mark.parametrize("raw", [b"\x12", b"\x12\x05ab", b"\x12\xff\xff"])
def test_a_truncated_chunk_is_the_runtimes_decode_error(raw):
    with pytest.raises(DecodeError):
        decode_upload(raw)
