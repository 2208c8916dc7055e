from __future__ import annotations

import numpy as np
import pytest

from pr2_serve.routes import (
    EncodedRoutes,
    decode_routes,
    encode_routes,
    route_dtype,
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
