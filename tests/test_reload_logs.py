"""A weight reload logs no warning that every push logs by design (vLLM's "RotaryEmbedding:
Failed to load weights", "PR2Predictor: ..." for a checkpoint without predictors, and one
"Attempted to load weight ... with dtype" line per tensor cast to the served dtype), and keeps
every other warning: vLLM's own reload and loader code under :func:`quiet_reload_logs`, then a
real push to the shared server, read from its log."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from safetensors.torch import load_file

from pr2_serve.client import HttpClient
from pr2_serve.plugin.weights import RELOAD_LOGGERS, quiet_reload_logs
from tests.helpers import API_KEY

pytestmark = pytest.mark.vllm


class Layer(torch.nn.Module):
    """A layer with one weight (its class name is what vLLM's warning names)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))


def named(name: str) -> torch.nn.Module:
    return type(name, (Layer,), {})()


@pytest.fixture()
def warnings_seen():
    """The messages vLLM's reload loggers let through (a handler on each logger runs after
    the logger's own filters)."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    yield seen
    for logger in loggers:
        logger.removeHandler(handler)


def reload_nothing_and_cast() -> None:
    """vLLM's layerwise reload of a model that gets no weights, then its weight loader casting
    an fp32 and an int32 tensor into bf16 parameters."""
    from vllm.model_executor.model_loader.reload import layerwise
    from vllm.model_executor.models.utils import AutoWeightsLoader

    model = torch.nn.Module()
    for name in ("RotaryEmbedding", "MRotaryEmbedding", "PR2Predictor", "Qwen3MoeAttention"):
        setattr(model, name.lower(), named(name))
    layerwise.record_metadata_for_reloading(model)
    layerwise.initialize_layerwise_reload(model)
    layerwise.finalize_layerwise_processing(model, None)
    target = torch.nn.Module()
    target.a = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    target.b = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    AutoWeightsLoader(target).load_weights(
        [("a", torch.ones(2)), ("b", torch.ones(2, dtype=torch.int32))]
    )


def test_the_expected_reload_warnings_are_dropped_and_the_others_kept(warnings_seen):
    with quiet_reload_logs():
        reload_nothing_and_cast()
    assert warnings_seen == [
        "Qwen3MoeAttention: Failed to load weights",  # a real layer that loaded nothing
        "Attempted to load weight b with dtype torch.int32 into parameter with dtype "
        "torch.bfloat16",
    ]
    warnings_seen.clear()
    reload_nothing_and_cast()  # outside a reload: nothing is filtered
    assert len(warnings_seen) == 6


def test_a_push_logs_no_reload_warnings(zero_server, tiny_zero):
    """The shared server (a stock checkpoint: no predictor tensors) pushed its own weights."""
    tensors = load_file(str(tiny_zero / "model.safetensors"))
    c = HttpClient(zero_server.http, api_key=API_KEY)
    start = len(zero_server.log)
    c.push_weights(tensors, c.info()["weight_version"] + 1)
    c.generate([[1, 2, 3]], max_tokens=2)
    time.sleep(0.5)  # (the log is read by a thread)
    c.close()
    lines = zero_server.log[start:]
    assert any("Successfully reset prefix cache" in line for line in lines), lines  # the reload
    noisy = [line for line in lines if "Failed to load weights" in line or "with dtype" in line]
    assert noisy == []
