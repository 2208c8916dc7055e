"""A fix for vLLM 0.32's CPU rotary embedding on DeepSeek's attention.

vLLM's CPU kernel (``torch.ops._C.rotary_embedding``) reads a query or key as
``[tokens, heads * dim]``: it takes ``x.size(-1) / head_size`` as the number of heads and
``x.stride(-2)`` as the token stride. DeepSeek-V2/V3's attention hands it 3-D slices instead:

- the query's rope part, ``[tokens, heads, rope_dim]`` (MLA and plain path alike): the kernel
  sees ``heads * tokens`` one-head rows and turns head ``h`` of token ``t`` by position
  ``t * heads + h`` -- and the rows past the step's token count not at all. Right with one head.
- on the MLA path, the key ``k_pe.unsqueeze(1)``, ``[tokens, 1, rope_dim]`` whose ``stride(-2)``
  is ``rope_dim``, not the latent row: the kernel rotates the wrong memory (the next tokens'
  latent ``kv_c``) and leaves the keys of every token but the first unrotated. The plain path's
  key has the latent row as ``stride(-2)`` and is right.

So stock vLLM on the CPU serves DeepSeek wrong on the MLA path, and with more than one attention
head on both (log-probs ~1e-3 off transformers on the tiny models); the CUDA kernel reads the
strides of every dimension and is right. :func:`fix_multihead_rope` makes a rotary module pass
the kernel ``[tokens, heads * dim]`` rows (a contiguous copy when the slice is strided) and write
the result back: what the CUDA build and transformers compute. Where stock is right (one head,
plain path) it passes the kernel the same rows with the same strides: bit-identical.
"""

from __future__ import annotations

import torch

FIXED_ATTR = "_pr2_multihead_rope_fixed"


def fix_multihead_rope(rope: torch.nn.Module) -> None:
    """Make ``rope`` (a vLLM ``RotaryEmbedding``, on the CPU) rotate 3-D multi-head queries
    and keys per head; idempotent (vLLM shares one rotary module between layers)."""
    if getattr(rope, FIXED_ATTR, False):
        return
    stock = rope._forward_method

    def forward(positions, query, key=None):
        q2 = _as_rows(query)
        k2 = None if key is None else _as_rows(key)
        q2, k2 = stock(positions, q2, k2)  # in place on the CPU kernel, new tensors natively
        _write_back(query, q2)
        if key is not None:
            _write_back(key, k2)
        return query, key

    rope._forward_method = forward
    setattr(rope, FIXED_ATTR, True)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[tokens, heads * dim]`` with unit stride inside a row (a view when possible)."""
    if x.dim() == 2:
        return x
    rows = x.reshape(x.shape[0], -1)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _write_back(x: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy ``rows`` into ``x`` unless ``rows`` is a view of it (a reshape view starts at the
    same address; a copy or a new tensor never does)."""
    if rows.data_ptr() != x.data_ptr():
        x.copy_(rows.view(x.shape))


def fix_deepseek_attention_rope(model: torch.nn.Module) -> int:
    """Apply :func:`fix_multihead_rope` to every DeepSeek attention layer's rotary module of
    ``model`` when vLLM runs on the CPU; returns how many layers were fixed (0 elsewhere)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    fixed = 0
    for layer in model.model.layers:
        rope = getattr(getattr(layer, "self_attn", None), "rotary_emb", None)
        if rope is not None and hasattr(rope, "_forward_method"):
            fix_multihead_rope(rope)
            fixed += 1
    return fixed
