from __future__ import annotations

import numpy as np
import pytest

from pr2_serve.core.route_protocol import (
    EncodedRoutes,
    capture_dtype,
    child_index,
    decode_routes,
    encode_routes,
    prompt_index,
    request_id,
    route_dtype,
    route_rows,
    store_key,
    validate_routes,
)


def test_dtype_choice():
    assert route_dtype(8) == np.uint8 and route_dtype(256) == np.uint8
    assert route_dtype(257) == np.uint16 and route_dtype(65536) == np.uint16
    with pytest.raises(ValueError):
        route_dtype(0)


@pytest.mark.parametrize("experts", [8, 300])
def test_roundtrip_and_slicing(experts):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, experts, size=(17, 4, 2)).astype(route_dtype(experts))
    enc = encode_routes(arr)
    assert len(enc.data) == arr.size * arr.itemsize
    np.testing.assert_array_equal(decode_routes(EncodedRoutes.from_json(enc.to_json())), arr)
    tail = decode_routes(encode_routes(arr, start=10))
    np.testing.assert_array_equal(tail, arr[10:])


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError, match="bytes"):
        decode_routes(EncodedRoutes("uint8", (2, 4, 2), b"\x00" * 15))
    with pytest.raises(ValueError, match="dtype"):
        decode_routes(EncodedRoutes("int64", (1, 1, 1), b"\x00" * 8))


def test_validate_catches_zero_filled_holes():
    ok = np.array([[[0, 1], [2, 3]]], dtype=np.uint8)
    validate_routes(ok, 2, 2, 4)
    with pytest.raises(ValueError, match="repeats"):
        validate_routes(np.zeros((1, 2, 2), np.uint8), 2, 2, 4)
    with pytest.raises(ValueError, match="num_experts"):
        validate_routes(ok + 3, 2, 2, 4)


def test_key_protocol_round_trips():
    rid = request_id("job7", 3)
    assert prompt_index(rid) == 3
    assert child_index(rid) == 0  # n == 1: vLLM keeps the id
    assert child_index(f"2_{rid}") == 2  # vLLM's name for child 2 of an n > 1 request
    assert store_key(rid, 2) == f"{rid}/2"
    assert len({store_key(request_id("j", i), s) for i in range(3) for s in range(3)}) == 9


def test_route_rows_is_every_position_but_the_last_token():
    assert route_rows(3, 1) == 3
    assert route_rows(5, 8) == 12


def test_capture_dtype_holds_every_expert_id():
    import torch

    assert capture_dtype(128) == torch.int16 and capture_dtype(32767) == torch.int16
    assert capture_dtype(40000) == torch.int32


def test_validate_routes_checks_the_row_count():
    ok = np.array([[[0, 1], [2, 3]]] * 4, np.uint8)
    validate_routes(ok, 2, 2, 4, num_rows=4)
    with pytest.raises(ValueError, match="rows"):
        validate_routes(ok, 2, 2, 4, num_rows=5)
