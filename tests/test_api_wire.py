"""One builder of a sample's fields and routes for both wires (``api.sample_fields``)."""

from __future__ import annotations

import numpy as np
import pytest

from pr2_serve.api.sample_fields import route_window, sample_fields
from pr2_serve.core.route_protocol import decode_routes
from pr2_serve.core.types import Rollout

ROUTES = np.arange(10 * 4 * 2, dtype=np.uint8).reshape(10, 4, 2)


@pytest.mark.parametrize(
    "routes_from, routes_start, rows, start",
    [
        (0, 0, slice(0, 10), 0),  # a whole sample
        (3, 0, slice(3, 10), 3),  # its tail
        (99, 0, slice(10, 10), 10),  # past its end: no rows, start at the end
        (0, 5, slice(0, 10), 5),  # a stream event's rows 5..14
        (7, 5, slice(2, 10), 7),  # ... from position 7
        (2, 5, slice(0, 10), 5),  # ... asked from before the event's first row
    ],
)
def test_route_window(routes_from, routes_start, rows, start):
    enc, first = route_window(ROUTES, routes_from, routes_start)
    assert first == start
    np.testing.assert_array_equal(decode_routes(enc), ROUTES[rows])
    assert enc.data == ROUTES[rows].astype("<u1").tobytes()


def test_uint16_routes_are_little_endian():
    routes = (np.arange(24, dtype=np.uint16) * 300).reshape(3, 4, 2)
    enc, _ = route_window(routes, 1)
    assert enc.dtype == "uint16" and enc.data == routes[1:].astype("<u2").tobytes()


def test_sample_fields():
    r = Rollout(
        prompt_index=1,
        sample_index=2,
        prompt_token_ids=[1, 2],
        output_token_ids=[3],
        logprobs=[-0.5],
        routes=ROUTES[:2],
        finish_reason="length",
        weight_version=4,
    )
    assert sample_fields(r) == {
        "prompt_index": 1,
        "sample_index": 2,
        "prompt_token_ids": [1, 2],
        "output_token_ids": [3],
        "logprobs": [-0.5],
        "finish_reason": "length",
        "weight_version": 4,
    }
