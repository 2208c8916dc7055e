"""The CPU rotary-embedding fix for DeepSeek's multi-head queries (no engine: the kernel alone).

DeepSeek's attention rotates the rope slice of a ``[tokens, heads, qk_head_dim]`` query in place;
vLLM 0.32's CPU kernel rotates head ``h`` of token ``t`` by position ``t * heads + h`` there.
The fixed module must equal an independent float64 GPT-J-style rotation (DeepSeek's interleaved
pairs) and leave the rest of the query untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm

T, HEADS, NOPE, ROPE, LATENT = 17, 2, 32, 64, 512


def _reference(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Interleaved rotation in float64: pair ``(2j, 2j+1)`` turned by ``pos * theta^(-2j/d)``."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = positions[:, None].astype(np.float64) * inv[None]  # [T, d/2]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    out = np.empty_like(x, dtype=np.float64)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out[..., 0::2], out[..., 1::2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


@pytest.fixture(scope="module")
def rope():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        params = {"rope_theta": 10000.0, "rope_type": "default"}
        yield lambda: get_rope(ROPE, 2048, is_neox_style=False, rope_parameters=params)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, HEADS, NOPE + ROPE, generator=g)
    latent = torch.randn(T, LATENT + ROPE, generator=g)
    # a slice of a longer positions buffer, as the model runner passes it
    positions = torch.arange(64)[:T]
    return q, latent, positions


def _rotate(module, q, latent, positions):
    """Rotate as DeepSeek's attention does: the query's rope slice and the latent's key part."""
    q, latent = q.clone(), latent.clone()
    k_pe = latent.unsqueeze(1)[..., LATENT:]
    q[..., NOPE:], k_pe = module(positions, q[..., NOPE:], k_pe)
    return q, k_pe


def test_fixed_rope_equals_float64_reference(rope):
    from pr2_serve.plugin.cpu_rope import fix_multihead_rope

    q, latent, positions = _inputs()
    module = rope()
    module._forward_method = module.forward_cpu  # what the CPU engine dispatches to
    fix_multihead_rope(module)
    fix_multihead_rope(module)  # idempotent
    got_q, got_k = _rotate(module, q, latent, positions)
    pos = positions.numpy()
    ref_q = _reference(q[..., NOPE:].double().numpy(), pos)
    ref_k = _reference(latent[:, None, LATENT:].double().numpy(), pos)
    np.testing.assert_allclose(got_q[..., NOPE:].double().numpy(), ref_q, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_k.double().numpy(), ref_k, atol=1e-5, rtol=0)
    assert torch.equal(got_q[..., :NOPE], q[..., :NOPE])  # the non-rotary part untouched


def test_stock_cpu_kernel_misrotates_multihead_queries(rope):
    """What the fix is for: the stock CPU kernel rotates head ``h`` of token ``t`` by position
    ``t * heads + h`` (and rows past the token count not at all); the key is right."""
    q, latent, positions = _inputs()
    stock = rope()
    got_q, got_k = _rotate(stock.forward_cpu, q, latent, positions)
    pos = positions.numpy()
    ref_k = _reference(latent[:, None, LATENT:].double().numpy(), pos)
    np.testing.assert_allclose(got_k.double().numpy(), ref_k, atol=1e-5, rtol=0)
    flat = np.arange(T * HEADS)
    wrong = np.where(flat < T, flat, 0).reshape(T, HEADS)
    for h in range(HEADS):
        ref = _reference(q[:, h : h + 1, NOPE:].double().numpy(), wrong[:, h])
        np.testing.assert_allclose(got_q[:, h : h + 1, NOPE:].double().numpy(), ref, atol=1e-5)
    right = _reference(q[..., NOPE:].double().numpy(), pos)
    assert np.abs(got_q[..., NOPE:].double().numpy() - right).max() > 0.1
