"""The families with their own routers, served by the plugin on the CPU build: routes equal an
independent HF forward with the same predictor on every (token, layer) row, log-probs within
1e-5 (fp32), and a zero predictor is bit-identical to stock vLLM.

GLM-4.5 and DeepSeek-V3: grouped sigmoid routing with a correction bias, one shared expert
(not routed, so not captured), the first layer dense. GPT-OSS: a router with a bias."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pr2_serve.engine import RolloutEngine, Sampling
from pr2_serve.tiny_model import TinySpec, make_tiny_model
from tests.helpers import assert_same_samples, hf_logprobs, hf_routes, load_hf, same_rows

SERVED_ON_CPU = ["glm4_moe"]


def _prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=n).tolist() for n in (4, 17, 40)]


def _oracle_rows(model_dir, rollouts):
    """``(rows equal to HF with the predictor, rows that differ from HF without it, worst
    |log-prob| gap with the served routes forced)``."""
    model, replay = load_hf(model_dir)
    agree = total = moved = 0
    worst = 0.0
    for r in rollouts:
        tokens = r.prompt_token_ids + r.output_token_ids
        ok = same_rows(hf_routes(model, replay, tokens, use_predictor=True), r.routes)
        agree, total = agree + int(ok.sum()), total + ok.size
        moved += int((~same_rows(hf_routes(model, replay, tokens, False), r.routes)).sum())
        lp = hf_logprobs(model, replay, r.prompt_token_ids, r.output_token_ids, r.routes)
        worst = max(worst, float(np.abs(lp - np.array(r.logprobs)).max()))
    return agree, total, moved, worst


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("arch", SERVED_ON_CPU)
def test_served_routes_equal_hf_and_zero_predictor_is_stock(arch, tmp_path):
    spec = TinySpec(arch=arch)
    live = make_tiny_model(tmp_path / "live", seed=3, predictor="random", spec=spec)
    stock_dir = make_tiny_model(tmp_path / "stock", seed=3, predictor="zero", spec=spec)
    sampling = Sampling(n=2, max_tokens=10, seed=0)
    with RolloutEngine(live, dtype="float32", max_model_len=256) as engine:
        assert engine.info.top_k == spec.top_k and engine.info.num_experts == spec.num_experts
        assert engine.info.moe_layer_indices == tuple(range(spec.first_dense_layers, 4))
        rollouts = engine.generate(_prompts(), sampling)
        zeros = {
            f"model.layers.{i}.mlp.predictor.weight": torch.zeros(16, spec.hidden_size)
            for i in engine.info.moe_layer_indices
        }
        engine.update_weights(zeros, version=1)
        zero_pr2 = engine.generate(_prompts(), sampling, return_routes=False)
    assert rollouts[0].routes.shape[1:] == (3, spec.top_k)
    agree, total, moved, worst = _oracle_rows(live, rollouts)
    assert agree == total, f"{total - agree} of {total} (token, layer) rows differ from HF"
    assert moved > 0  # the predictor changed some routes, and HF agrees on them
    assert worst < 1e-5
    with RolloutEngine(stock_dir, dtype="float32", max_model_len=256, plugin=False) as stock:
        plain = stock.generate(_prompts(), sampling, return_routes=False)
    assert_same_samples(zero_pr2, plain, atol=0.0)
