"""The storage a committed update let go of, made into the next update's tensors
(:mod:`pr2_serve.plugin.spare_storage`). Pure torch."""

from __future__ import annotations

import torch

from pr2_serve.plugin.spare_storage import SpareStorage


def meta_param(*shape: int, dtype=torch.float32) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    p.weight_loader = "its loader"  # an attribute vLLM's loaders rely on
    return p


def test_a_tensor_is_made_in_kept_storage_of_its_exact_size():
    spare, old = SpareStorage(), torch.randn(4, 8)
    spare.keep([old])
    ptr = old.data_ptr()
    del old
    assert spare.nbytes == 4 * 8 * 4
    t = spare.like(meta_param(8, 4))
    assert t.data_ptr() == ptr and spare.nbytes == 0
    assert type(t) is torch.nn.Parameter and not t.requires_grad
    assert t.shape == (8, 4) and t.stride() == (4, 1) and t.dtype == torch.float32
    assert t.weight_loader == "its loader" and t.device.type == "cpu"
    t.copy_(torch.ones(8, 4))  # writable, its own memory
    assert torch.equal(t, torch.ones(8, 4))


def test_other_sizes_and_dtypes_get_new_memory_or_the_storage_of_their_size():
    spare = SpareStorage()
    spare.keep([torch.zeros(16, dtype=torch.float32)])  # 64 bytes
    other = spare.like(meta_param(8))  # 32 bytes: not that storage
    assert other.untyped_storage().nbytes() == 32 and spare.nbytes == 64
    half = spare.like(meta_param(4, 8, dtype=torch.bfloat16))  # 64 bytes: bytes, not dtype
    assert half.dtype == torch.bfloat16 and half.shape == (4, 8) and spare.nbytes == 0


def test_storage_still_held_elsewhere_is_never_written_over():
    spare, old = SpareStorage(), torch.randn(32)
    spare.keep([old])
    t = spare.like(meta_param(32))  # ``old`` is alive: forgotten, new memory
    assert t.data_ptr() != old.data_ptr() and spare.nbytes == 0
    view = torch.randn(64)[::2]  # a view keeps its base's storage: also never used
    spare.keep([view])
    assert spare.like(meta_param(64)).data_ptr() != view.data_ptr()


def test_each_storage_is_kept_once_and_a_strided_tensor_spans_what_it_needs():
    spare, base = SpareStorage(), torch.randn(6, 5)
    spare.keep([base, base[:, 1:], base.t()])  # three tensors, one storage
    assert spare.nbytes == 6 * 5 * 4
    ptr = base.data_ptr()
    del base
    meta = torch.empty(5, 6, device="meta").t()  # stride (1, 6): spans all 30 elements
    t = spare.like(meta)
    assert t.data_ptr() == ptr and t.stride() == (1, 6) and t.shape == (6, 5)
    spare.keep([torch.empty(0)])  # nothing to keep
    assert spare.nbytes == 0
