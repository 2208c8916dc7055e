"""Test helpers: the test API key and server launcher; the independent HF transformers oracle
of a served checkpoint."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pr2_serve.server.launch import Server
from pr2_serve.server.launch import start_server as _start_server
from trainer.algo.replay import MoEReplay, RoutingControl

API_KEY = "test-key-1234"  # tests, benchmarks and the reliability suite only


def start_server(model_dir, state_dir, *extra: str, api_key: str | None = API_KEY, **kw) -> Server:
    """``pr2_serve.server.launch.start_server`` with the test key by default."""
    return _start_server(model_dir, state_dir, *extra, api_key=api_key, **kw)


def start_servers(*specs: tuple) -> list[Server]:
    """Several servers started at once, one per ``(model_dir, state_dir, *extra)``: their
    start-ups (mostly one busy core each) overlap instead of adding up. All or none: if one
    fails, the others are stopped."""
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(start_server, *spec) for spec in specs]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result().stop()
        raise errors[0]
    return [f.result() for f in futures]


def load_hf(model_dir: str | Path) -> tuple[torch.nn.Module, MoEReplay]:
    """HF model of the checkpoint in fp32 with routing control and its predictors loaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    replay = MoEReplay(model)
    tensors = {}
    for f in Path(model_dir).glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    replay.load_predictors(tensors)
    return model, replay


@torch.no_grad()
def hf_routes(model, replay: MoEReplay, tokens: list[int], use_predictor: bool) -> np.ndarray:
    """Routes the HF model chooses on ``tokens[:-1]`` (the positions that get forwarded)."""
    ctl = RoutingControl(use_predictor=use_predictor, record=True)
    with replay.control(ctl):
        model(torch.tensor([tokens[:-1]]))
    return ctl.recorded_routes().numpy()


@torch.no_grad()
def hf_logprobs(
    model, replay: MoEReplay, prompt: list[int], output: list[int], routes: np.ndarray | None
) -> np.ndarray:
    """Log-probs of ``output`` given ``prompt`` with ``routes`` replayed (None: natural+pred)."""
    tokens = prompt + output
    ctl = RoutingControl(
        forced_ids=None if routes is None else torch.as_tensor(routes.astype(np.int64)),
        use_predictor=routes is None,
    )
    with replay.control(ctl):
        logits = model(torch.tensor([tokens[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1 :]
    return lp.gather(-1, torch.tensor(output)[:, None])[:, 0].numpy()


def assert_same_samples(a, b, atol: float = 0.0) -> None:
    """Two lists of samples: the same tokens and routes, log-probs within ``atol`` (0: equal)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.output_token_ids == y.output_token_ids
        np.testing.assert_allclose(np.array(x.logprobs), np.array(y.logprobs), atol=atol, rtol=0)
        np.testing.assert_array_equal(x.routes, y.routes)


def same_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per (token, layer): do the two routes pick the same experts (as sets)?"""
    return (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(-1)
