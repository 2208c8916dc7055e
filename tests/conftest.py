from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.start_budget", "tests.skip_unselected"]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory):
    """Tiny Qwen3-MoE with a random (live) predictor."""
    from pr2_serve.tiny.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_random"), seed=0, predictor="random")


@pytest.fixture(scope="session")
def tiny_zero(tmp_path_factory):
    """Tiny Qwen3-MoE, stock checkpoint (no predictor tensors)."""
    from pr2_serve.tiny.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_zero"), seed=0, predictor="zero")


# -- servers shared across modules (a real pr2-serve starts in ~40-60 s on 2 cores) ---------------
@pytest.fixture(scope="session")
def bpe_random(tmp_path_factory):
    """Tiny Qwen3-MoE with a byte-level BPE tokenizer (chat template) and a random predictor."""
    from pr2_serve.tiny.tiny_model import make_tiny_model

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
def weights_dir(tmp_path_factory):
    """``--weights-dir`` of ``zero_server``: the one directory it may load checkpoints from."""
    return tmp_path_factory.mktemp("weights-dir")


@pytest.fixture(scope="session")
def zero_server(tiny_zero, weights_dir, tmp_path_factory):
    """``pr2-serve`` on ``tiny_zero`` with every opt-in flag the tests need (collective
    transfers, loading from ``weights_dir``, small body limits, fault injection, 0.25 MiB
    buckets: a whole-model upload arrives in 8): the server of
    every test that needs "a server". Tests take versions relative to what it serves
    (``info()["weight_version"]``), and a module that needs the model's own weights takes
    ``model_weights_server`` (rolled back to version 0 first)."""
    from tests.helpers import start_server

    srv = start_server(
        tiny_zero,
        tmp_path_factory.mktemp("zero-state"),
        "--enable-weight-transfer",
        "--weights-dir",
        str(weights_dir),
        "--max-upload-bytes",
        str(8 << 20),
        "--max-request-bytes",
        str(1 << 20),
        "--bucket-mib",
        "0.25",
        env={"PR2_ENABLE_FAULT_INJECTION": "1"},
    )
    yield srv
    assert srv.stop() == 0, "".join(srv.log[-40:])


@pytest.fixture(scope="module")
def model_weights_server(zero_server):
    """``zero_server`` serving ``tiny_zero``'s own weights again (a rollback to version 0,
    served as the next version number), for a module that compares with them."""
    from pr2_serve.client import HttpClient
    from tests.helpers import API_KEY

    c = HttpClient(zero_server.http, api_key=API_KEY)
    c.rollback(0)
    c.close()
    return zero_server


@pytest.fixture(scope="session")
def second_server(tiny_zero, tmp_path_factory):
    """A second ``pr2-serve`` on ``tiny_zero`` (default flags but uploads applied once stored,
    ``--apply-uploads stored``), for the tests that need two."""
    from tests.helpers import start_server

    srv = start_server(
        tiny_zero, tmp_path_factory.mktemp("second-state"), "--apply-uploads", "stored"
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def random_engine(tiny_random):
    """The in-process reference engine on ``tiny_random`` (fp32): what a server on the same
    weights must serve, token for token."""
    from pr2_serve.engine.rollout_engine import RolloutEngine

    with RolloutEngine(tiny_random, dtype="float32", max_model_len=512) as engine:
        yield engine


@pytest.fixture
def reference(random_engine):
    """``random_engine`` on ``tiny_random``'s own weights; a test may update it (its versions
    are its own): it is put back on the checkpoint's weights afterwards."""
    version = random_engine.weight_version
    yield random_engine
    if random_engine.weight_version != version:
        random_engine.commit_update({}, random_engine.weight_version + 1, replace=True).result()
