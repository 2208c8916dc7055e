"""The process's random number generators as checkpoint data: python, numpy, torch (and CUDA)
states as JSON and tensors (no pickle), and back."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The python, numpy, torch (and CUDA) RNG states as JSON and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": has_gauss, "gauss": gauss},
    }
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(keys)}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = meta["numpy"]
    keys = tensors["rng.numpy_keys"].numpy()
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
