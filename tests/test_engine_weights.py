"""Zero predictor == stock vLLM; weight updates == a freshly started engine on the same weights.

The CPU build prepacks weights at load time, so an in-place update is only trusted when it is
shown equal to a fresh load: greedy tokens identical, log-probs within 1e-5 (fp32), routes equal.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.core.served_checkpoint import WeightValidationError
from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling
from pr2_serve.tiny.tiny_model import make_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [[5, 6, 7], list(range(40, 80)), [200, 1, 2, 3, 4, 5, 6, 7, 8], list(range(100, 117))]
GREEDY = Sampling(temperature=0.0, max_tokens=12)


def greedy(engine: RolloutEngine):
    return engine.generate(PROMPTS, GREEDY)


def assert_same(a, b, tol=1e-5):
    for x, y in zip(a, b, strict=True):
        assert x.output_token_ids == y.output_token_ids
        assert np.abs(np.array(x.logprobs) - np.array(y.logprobs)).max() <= tol
        np.testing.assert_array_equal(x.routes, y.routes)


def fresh(model_dir):
    with RolloutEngine(model_dir, dtype="float32", max_model_len=256) as e:
        return greedy(e)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A and B (different seeds, random predictors) and the mix policy(B) + predictor(A)."""
    root = tmp_path_factory.mktemp("ckpts")
    a = make_tiny_model(root / "a", seed=0, predictor="random")
    b = make_tiny_model(root / "b", seed=1, predictor="random")
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    pred = {n for n in ta if ".predictor." in n}
    mix = make_tiny_model(root / "mix", seed=1, predictor="zero")
    save_file(
        {**{n: tb[n] for n in tb if n not in pred}, **{n: ta[n] for n in pred}},
        str(mix / "model.safetensors"),
    )
    policy_b = {n: tb[n] for n in tb if n not in pred}
    return a, b, mix, ta, tb, policy_b, {n: tb[n] for n in pred}, pred


def test_zero_predictor_is_stock_vllm(tiny_zero):
    """A stock checkpoint served through the plugin (architecture overridden, files untouched)
    gives exactly stock vLLM's greedy tokens and log-probs."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(
        str(tiny_zero),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        distributed_executor_backend="uni",
        seed=0,
    )
    assert llm.llm_engine.model_config.architectures == ["Qwen3MoeForCausalLM"]
    stock = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        SamplingParams(temperature=0.0, max_tokens=12, logprobs=0),
        use_tqdm=False,
    )
    del llm
    gc.collect()
    ours = fresh(tiny_zero)
    for s, o in zip(stock, ours, strict=True):
        c = s.outputs[0]
        assert list(c.token_ids) == o.output_token_ids
        assert [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)] == o.logprobs


def test_updates_equal_fresh_engines_and_bad_ones_change_nothing(checkpoints, tmp_path):
    """Bad updates are refused and change nothing; good ones (policy only, predictor only from
    a file, both) equal a fresh engine on those weights. The engine on A is itself a fresh
    engine on A: its first outputs are A's reference."""
    a, b, mix, ta, _, policy_b, pred_b, pred = checkpoints
    ref_b, ref_mix = fresh(b), fresh(mix)
    with RolloutEngine(a, dtype="float32", max_model_len=256) as engine:
        ref_a = greedy(engine)
        assert ref_a[0].output_token_ids != ref_b[0].output_token_ids  # the update is visible
        refuse_bad_updates(engine, sorted(pred)[0])
        assert engine.weight_version == 0
        assert_same(greedy(engine), ref_a, tol=0.0)
        # policy only: B's policy, A's predictors
        res = engine.update_weights(policy_b, version=1)
        print(f"policy update: {res.num_tensors} tensors, reload {res.reload_seconds * 1e3:.1f} ms")
        out = greedy(engine)
        assert {r.weight_version for r in out} == {1}
        assert_same(out, ref_mix)
        # predictor only (from a safetensors file): now all of B
        path = tmp_path / "pred_b.safetensors"
        save_file(pred_b, str(path))
        res = engine.update_weights(str(path), version=2)
        print(
            f"predictor update: {res.num_tensors} tensors, reload {res.reload_seconds * 1e3:.1f} ms"
        )
        assert_same(greedy(engine), ref_b)
        # both at once, back to A
        res = engine.update_weights(ta, version=5)
        print(f"full update: {res.num_tensors} tensors, reload {res.reload_seconds * 1e3:.1f} ms")
        out = greedy(engine)
        assert {r.weight_version for r in out} == {5}
        assert_same(out, ref_a)


def refuse_bad_updates(engine: RolloutEngine, name: str) -> None:
    """Unknown names, wrong shapes/dtypes, a version not above the served one, nothing, and a
    file that is not safetensors: each refused with a message naming the problem."""
    bad = [
        ({"model.layers.0.mlp.nonexistent.weight": torch.zeros(8, 64)}, 1, "unknown"),
        ({name: torch.zeros(8, 32)}, 1, "shape"),
        ({name: torch.zeros(8, 64, dtype=torch.int64)}, 1, "dtype"),
        ({name: torch.ones(8, 64)}, 0, "greater"),
        ({}, 1, "empty"),
    ]
    for weights, version, msg in bad:
        with pytest.raises(WeightValidationError, match=msg):
            engine.update_weights(weights, version)
    with pytest.raises(WeightValidationError, match="safetensors"):
        engine.update_weights(__file__, 1)
