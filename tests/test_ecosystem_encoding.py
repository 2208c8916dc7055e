"""The route encodings of the OpenAI (vLLM) and SGLang dialects, decoded as their readers do."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from pr2_serve.core.route_protocol import int32_base64, npy_base64


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_npy_base64_is_vllms_encoding(dtype):
    rng = np.random.default_rng(0)
    routes = rng.integers(0, 200, size=(9, 4, 2)).astype(dtype)
    for start in (0, 3, 9):
        data = base64.b64decode(npy_base64(routes, start))
        back = np.load(io.BytesIO(data), allow_pickle=False)  # vLLM's documented decode
        assert back.dtype == dtype and back.shape == (9 - start, 4, 2)
        np.testing.assert_array_equal(back, routes[start:])
    # the vLLM serializer itself gives the same bytes
    from vllm.utils.serial_utils import numpy2base64

    assert npy_base64(routes) == numpy2base64(routes)


def test_int32_base64_is_sglangs_encoding():
    routes = np.random.default_rng(1).integers(0, 300, size=(7, 3, 2)).astype(np.uint16)
    flat = np.frombuffer(base64.b64decode(int32_base64(routes, 2).encode("ascii")), np.int32)
    assert flat.size == 5 * 3 * 2
    np.testing.assert_array_equal(flat.reshape(5, 3, 2), routes[2:])
