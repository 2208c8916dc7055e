"""The CPU rotary-embedding fix for DeepSeek's attention (no engine: the kernel alone).

DeepSeek's attention rotates the rope slice of a ``[tokens, heads, qk_head_dim]`` query in place,
and a key that is a slice of the latent row (viewed two ways: the plain path's and the MLA
path's). vLLM 0.32's CPU kernel turns query head ``h`` of token ``t`` by position
``t * heads + h``, and on the MLA path rotates the wrong memory for the key. The fixed module
must equal an independent float64 rotation (DeepSeek's interleaved pairs) and leave the rest of
the query and of the latent untouched."""

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
    """A fresh DeepSeek rotary module per call (``get_rope`` would share one), dispatching to the
    CPU kernel as the CPU engine does."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    def make():
        module = RotaryEmbedding(ROPE, ROPE, 2048, 10000.0, False, torch.float32)
        module._forward_method = module.forward_cpu
        return module

    with set_current_vllm_config(VllmConfig()):
        yield make


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, HEADS, NOPE + ROPE, generator=g)
    latent = torch.randn(T, LATENT + ROPE, generator=g)
    # a slice of a longer positions buffer, as the model runner passes it
    positions = torch.arange(64)[:T]
    return q, latent, positions


def _rotate(module, q, latent, positions, mla: bool = False):
    """Rotate as DeepSeek's attention does: the query's rope slice and the latent's key part
    (``mla``: the key view of vLLM's MLA path, whose ``stride(-2)`` is the rope size)."""
    q, latent = q.clone(), latent.clone()
    if mla:
        k_pe = latent.split([LATENT, ROPE], dim=-1)[1].unsqueeze(1)
    else:
        k_pe = latent.unsqueeze(1)[..., LATENT:]
    q[..., NOPE:], k_pe = module(positions, q[..., NOPE:], k_pe)
    return q, k_pe, latent


@pytest.mark.parametrize("mla", [False, True])
def test_fixed_rope_equals_float64_reference(rope, mla):
    from pr2_serve.plugin.cpu_rope import fix_multihead_rope

    q, latent, positions = _inputs()
    module = rope()
    fix_multihead_rope(module)
    fix_multihead_rope(module)  # idempotent
    got_q, got_k, got_latent = _rotate(module, q, latent, positions, mla)
    pos = positions.numpy()
    ref_q = _reference(q[..., NOPE:].double().numpy(), pos)
    ref_k = _reference(latent[:, None, LATENT:].double().numpy(), pos)
    np.testing.assert_allclose(got_q[..., NOPE:].double().numpy(), ref_q, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_k.double().numpy(), ref_k, atol=1e-5, rtol=0)
    assert torch.equal(got_q[..., :NOPE], q[..., :NOPE])  # the non-rotary part untouched
    assert torch.equal(got_latent[:, :LATENT], latent[:, :LATENT])


def test_stock_cpu_kernel_misrotates_multihead_queries(rope):
    """What the fix is for: the stock CPU kernel rotates head ``h`` of token ``t`` by position
    ``t * heads + h`` (and rows past the token count not at all); the key is right."""
    q, latent, positions = _inputs()
    stock = rope()
    got_q, got_k, _ = _rotate(stock.forward_cpu, q, latent, positions)
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


def test_stock_cpu_kernel_misrotates_the_mla_key(rope):
    """On the MLA path's key view the stock kernel rotates other memory: the keys after the
    first stay unrotated and the next tokens' latent is overwritten."""
    q, latent, positions = _inputs()
    _, got_k, got_latent = _rotate(rope().forward_cpu, q, latent, positions, mla=True)
    ref_k = _reference(latent[:, None, LATENT:].double().numpy(), positions.numpy())
    assert np.abs(got_k.double().numpy() - ref_k).max() > 0.1
    assert not torch.equal(got_latent[:, :LATENT], latent[:, :LATENT])
