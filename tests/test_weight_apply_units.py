"""Units of the faster weight apply: tensors read out of safetensors files into their own memory
(:mod:`pr2_serve.core.tensor_files`), the KV blocks zeroed after a reload (:mod:`pr2_serve.plugin.
kv_dirty`), the finite check's summing fast path and the in-place tensor digest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.core.fingerprint import FileDigests, tensor_digest
from pr2_serve.core.served_checkpoint import non_finite_counts
from pr2_serve.core.tensor_files import iter_tensors
from pr2_serve.plugin.kv_dirty import DirtyBlocks


def test_iter_tensors_reads_every_dtype_and_shape(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).bfloat16(),
        "c": torch.zeros(0),
        "s": torch.tensor(2.0, dtype=torch.float16),
    }
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    got = dict(iter_tensors(dict.fromkeys(tensors, path)))
    ref = load_file(path)
    for k in tensors:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert list(dict(iter_tensors(dict.fromkeys(tensors, path), ["b"]))) == ["b"]


def test_iter_tensors_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own header check
        list(iter_tensors({"a": str(path)}))


def test_dirty_blocks_zero_only_what_was_written():
    caches = [torch.ones(6, 2, 4, 3) for _ in range(2)]  # [blocks, heads, block_size, 2*head]
    dirty = DirtyBlocks(num_blocks=6, block_size=4)
    assert dirty.zero(caches) == 6  # the first zeroing is of everything
    for t in caches:
        assert not t.any()
        t.fill_(1.0)
    dirty.note(np.array([-1, 0, 1, 9, 10, 21]))  # blocks 0, 2, 5 (-1: padding)
    assert dirty.zero(caches) == 3
    for t in caches:
        assert not t[[0, 2, 5]].any() and t[[1, 3, 4]].all()
    assert dirty.zero(caches) == 0  # nothing written since


def test_dirty_blocks_zero_everything_when_unsure():
    caches = [torch.ones(6, 2, 4, 3)]
    dirty = DirtyBlocks(num_blocks=6, block_size=4)
    dirty.zero(caches)
    caches[0].fill_(1.0)
    dirty.note(np.array([1]))
    dirty.forget()  # a step failed part-way
    assert dirty.zero(caches) == 6 and not caches[0].any()
    caches[0].fill_(1.0)
    dirty.note(np.array([24]))  # a slot past the layout it was told
    assert dirty.zero(caches) == 6 and not caches[0].any()
    other = DirtyBlocks(num_blocks=0, block_size=4)  # several KV groups: never trusted
    other.zero(caches)
    caches[0].fill_(1.0)
    other.note(np.array([1]))
    assert other.zero(caches) == 6 and not caches[0].any()


def test_non_finite_counts_exact_past_the_summing_fast_path():
    t = torch.ones(100)
    assert non_finite_counts(t) == (0, 0)
    t[3], t[7], t[9] = float("nan"), float("inf"), -float("inf")
    assert non_finite_counts(t) == (1, 2)
    big = torch.full((4,), 3e38)  # the sum overflows, every value is finite
    assert non_finite_counts(big) == (0, 0)


def test_digest_is_of_float32_values_and_files_match_memory(tmp_path):
    w = torch.randn(8, 4)
    assert tensor_digest("x", w) == tensor_digest("x", w.double())
    assert tensor_digest("x", w) != tensor_digest("y", w)
    path = str(tmp_path / "w.safetensors")
    save_file({"x": w}, path)
    cache = FileDigests()
    computed = cache.compute({"x": path})
    assert computed == {(path, "x"): tensor_digest("x", w)}
    assert cache.compute({"x": path}) == computed  # nothing cached until remembered
    cache.remember(computed)
    assert cache.compute({"x": path}) == {}
