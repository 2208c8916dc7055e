"""Every MoE family the plugin registers serves routes equal to the HF oracle, with that
family's own gating (Qwen3 / Mixtral renormalise, Qwen2-MoE / OLMoE do not)."""

from __future__ import annotations

import numpy as np
import pytest

from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling
from pr2_serve.tiny.tiny_model import TinySpec, make_tiny_model
from tests.helpers import hf_logprobs, hf_routes, load_hf, same_rows


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "olmoe"])
def test_family_routes_and_logprobs(arch, tmp_path):
    model_dir = make_tiny_model(
        tmp_path / arch, seed=3, predictor="random", spec=TinySpec(arch=arch)
    )
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (4, 17, 40)]
    with RolloutEngine(model_dir, dtype="float32", max_model_len=256) as engine:
        assert engine.info.num_moe_layers == 4 and engine.info.top_k == 2
        rollouts = engine.generate(prompts, Sampling(n=2, max_tokens=10, seed=0))
    model, replay = load_hf(model_dir)
    agree = total = moved = 0
    for r in rollouts:
        tokens = r.prompt_token_ids + r.output_token_ids
        ok = same_rows(hf_routes(model, replay, tokens, use_predictor=True), r.routes)
        agree, total = agree + int(ok.sum()), total + ok.size
        moved += int((~same_rows(hf_routes(model, replay, tokens, False), r.routes)).sum())
        lp = hf_logprobs(model, replay, r.prompt_token_ids, r.output_token_ids, r.routes)
        assert np.abs(lp - np.array(r.logprobs)).max() < 1e-4
    assert agree / total >= 0.999
    assert moved > 0
