"""What a sample and its routes look like on both wires (HTTP JSON and gRPC), built once.

:func:`sample_fields` are a finished sample's fields (HTTP ``Sample``, gRPC
``GenerateResponse``); :func:`route_window` is the part of a route array a request asked for
(``routes_from``), encoded as :func:`~pr2_serve.core.route_protocol.encode_routes` does for both
wires.
"""

from __future__ import annotations

import numpy as np

from pr2_serve.core.route_protocol import EncodedRoutes, encode_routes
from pr2_serve.core.types import Rollout

__all__ = ["route_window", "sample_fields"]


def route_window(
    routes: np.ndarray, routes_from: int, routes_start: int = 0
) -> tuple[EncodedRoutes, int]:
    """The rows of ``routes`` (whose first row is position ``routes_start``) at positions
    ``>= routes_from``, encoded, and the position of the first row sent."""
    skip = min(max(0, routes_from - routes_start), len(routes))
    return encode_routes(routes, skip), routes_start + skip


def sample_fields(r: Rollout) -> dict:
    """A finished sample's fields on both wires, routes aside."""
    return {
        "prompt_index": r.prompt_index,
        "sample_index": r.sample_index,
        "prompt_token_ids": r.prompt_token_ids,
        "output_token_ids": r.output_token_ids,
        "logprobs": r.logprobs,
        "finish_reason": r.finish_reason,
        "weight_version": r.weight_version,
    }
