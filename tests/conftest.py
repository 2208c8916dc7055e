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


# -- servers shared across modules (a real pr2-serve starts in ~40-60 s on 2 cores) ---------------
@pytest.fixture(scope="session")
def bpe_random(tmp_path_factory):
    """Tiny Qwen3-MoE with a byte-level BPE tokenizer (chat template) and a random predictor."""
    from pr2_serve.tiny_model import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("bpe_random"), seed=0, predictor="random", tokenizer="bpe"
    )


@pytest.fixture(scope="session")
def bpe_server(bpe_random, tmp_path_factory):
    """``pr2-serve`` on ``bpe_random`` with the default flags, for the client-compatibility
    modules (test_openai_compat, test_ecosystem): they only read from it (no push, rollback
    or restart), so one server serves them all."""
    from tests.helpers import start_server

    srv = start_server(bpe_random, tmp_path_factory.mktemp("bpe-state"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def zero_server(tiny_zero, tmp_path_factory):
    """``pr2-serve`` on ``tiny_zero`` with the default flags, for the trainer modules
    (test_trainer_loop, test_trainer_resume): a run starts from whatever version the server
    holds (test_trainer_resume rolls it back to the model's weights before each run)."""
    from tests.helpers import start_server

    srv = start_server(tiny_zero, tmp_path_factory.mktemp("zero-state"))
    yield srv
    srv.stop()
