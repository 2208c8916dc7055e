"""The devices the pure routing tests run on: the CPU always, CUDA when a GPU is present
(marked ``cuda``; what ``benchmarks/gpu_check.sh`` runs on a GPU host)."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]
