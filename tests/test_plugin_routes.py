"""Routes and log-probs from the real vLLM CPU build vs an independent HF transformers forward.

One engine, configured so every hard case happens: prompts longer than the step budget
(chunked prefill), many requests of different lengths at once (continuous batching), ``n=2``
(child requests sharing a prompt: prefix-cache hits) and a KV cache too small for all of them
(preemption + recompute). The counters from the worker prove each path ran.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import hf_logprobs, hf_routes, load_hf, same_rows

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def stressed(tiny_random):
    from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling

    engine = RolloutEngine(
        tiny_random,
        dtype="float32",
        max_model_len=512,
        max_num_batched_tokens=64,  # 150-token prompts prefill in chunks
        max_num_seqs=16,
        block_size=32,
        num_gpu_blocks_override=20,  # 640 KV slots for ~20 sequences of up to 170: preemption
    )
    rng = np.random.default_rng(0)
    lengths = [3, 7, 12, 20, 33, 50, 90, 150, 5, 64]
    prompts = [rng.integers(0, 256, size=n).tolist() for n in lengths]
    rollouts = engine.generate(prompts, Sampling(n=2, temperature=1.0, max_tokens=24, seed=7))
    # the same 100-token prompt twice, one after the other: the second hits the prefix cache
    shared = rng.integers(0, 256, size=100).tolist()
    for seed in (1, 2):
        again = engine.generate([shared], Sampling(temperature=1.0, max_tokens=8, seed=seed))
        rollouts += again
    stats = engine.route_stats()
    yield engine, prompts, rollouts, stats
    engine.close()


def test_shapes_and_dtype(stressed):
    _, prompts, rollouts, _ = stressed
    assert len(rollouts) == 2 * len(prompts) + 2
    for r in rollouts[: 2 * len(prompts)]:
        assert r.prompt_token_ids == prompts[r.prompt_index]
    for r in rollouts:
        assert r.routes.dtype == np.uint8
        assert r.routes.shape == (len(r.prompt_token_ids) + len(r.output_token_ids) - 1, 4, 2)
        assert len(r.logprobs) == len(r.output_token_ids)


def test_hard_paths_ran(stressed):
    _, _, _, stats = stressed
    assert stats["prefix_cache_rows"] > 0, stats
    assert stats["recomputed_rows"] > 0, stats  # preemption happened
    assert stats["tracked"] == 0, stats  # every request's rows were claimed


def test_route_oracle_and_replayed_logprobs(stressed, tiny_random):
    _, _, rollouts, _ = stressed
    model, replay = load_hf(tiny_random)
    agree = total = 0
    max_lp_err = 0.0
    for r in rollouts:
        tokens = r.prompt_token_ids + r.output_token_ids
        oracle = hf_routes(model, replay, tokens, use_predictor=True)
        ok = same_rows(oracle, r.routes)
        agree += int(ok.sum())
        total += ok.size
        lp = hf_logprobs(model, replay, r.prompt_token_ids, r.output_token_ids, r.routes)
        max_lp_err = max(max_lp_err, float(np.abs(lp - np.array(r.logprobs)).max()))
    print(f"route agreement {agree}/{total} = {agree / total:.5f}, max |dlogprob| {max_lp_err:.2e}")
    assert agree / total >= 0.999
    assert max_lp_err < 1e-4


def test_predictor_is_live(stressed, tiny_random):
    _, _, rollouts, _ = stressed
    model, replay = load_hf(tiny_random)
    differ = total = 0
    for r in rollouts:
        tokens = r.prompt_token_ids + r.output_token_ids
        plain = hf_routes(model, replay, tokens, use_predictor=False)
        oracle = hf_routes(model, replay, tokens, use_predictor=True)
        moved = ~same_rows(plain, r.routes)
        differ += int(moved.sum())
        total += moved.size
        # every row the predictor moved is exactly the predictor-adjusted oracle's
        assert same_rows(oracle, r.routes)[moved].all()
    print(f"rows moved by the predictor: {differ}/{total} = {differ / total:.3f}")
    assert differ / total > 0.05
