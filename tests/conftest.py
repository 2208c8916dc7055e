from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory):
    """Tiny Qwen3-MoE with a random (live) predictor."""
    from pr2_serve.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_random"), seed=0, predictor="random")


@pytest.fixture(scope="session")
def tiny_zero(tmp_path_factory):
    """Tiny Qwen3-MoE, stock checkpoint (no predictor tensors)."""
    from pr2_serve.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_zero"), seed=0, predictor="zero")
