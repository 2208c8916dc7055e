"""The trainer's old-logprob pass against real vLLM rollouts (CPU build, fp32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pr2_serve.engine.rollout_engine import Sampling
from trainer.algo.batch import make_batch
from trainer.algo.replay import RoutingControl
from trainer.algo.train_step import Learner
from trainer.run.config import TrainConfig
from trainer.run.policy import Policy, forward_logprobs

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def rollouts(random_engine):
    """Seeded samples of the session's engine on ``tiny_random`` (the weights ``policy`` has:
    a test that updates the engine puts it back on them)."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in (4, 9, 17, 30)]
    return random_engine.generate(prompts, Sampling(n=2, temperature=1.0, max_tokens=10, seed=3))


@pytest.fixture(scope="module")
def policy(tiny_random):
    return Policy(str(tiny_random))


def batch_of(samples, policy):
    rewards = torch.tensor([float(i % 2) for i in range(len(samples))])
    return make_batch(samples, rewards, 2, policy.replay.num_moe_layers, policy.replay.top_k)


def old_pass_dlogp(policy, batch, mode) -> float:
    cfg = TrainConfig(
        replay=mode, off_policy_steps=1, prompts_per_batch=4, lr=0.0, servers=["http://x"]
    )
    learner = Learner(policy, cfg)
    learner.pred_opt = None  # (the old pass and the mini-steps only)
    return learner.train_batch(batch)[0]


@pytest.mark.parametrize("mode", ["r3", "pr2"])
def test_replayed_old_pass_reproduces_server_logprobs(rollouts, policy, mode):
    batch = batch_of(rollouts, policy)
    with torch.no_grad():
        lp = forward_logprobs(
            policy,
            batch,
            RoutingControl(forced_ids=batch.routes.reshape(-1, *batch.routes.shape[2:])),
        )
    err = ((lp - batch.server_logprobs).abs() * batch.loss_mask).max()
    assert float(err) < 1e-4
    m = old_pass_dlogp(policy, batch, mode)
    assert m["train_infer_abs_dlogp"] < 1e-4
    assert m["first_ratio_max_dev"] == 0.0  # mini-step 1 replays theta_old exactly


def test_routes_matter_only_when_replayed(rollouts, policy):
    batch = batch_of(rollouts, policy)
    perturbed = dataclasses.replace(batch, routes=(batch.routes + 1) % policy.replay.num_experts)
    none_a = old_pass_dlogp(policy, batch, "none")["train_infer_abs_dlogp"]
    none_b = old_pass_dlogp(policy, perturbed, "none")["train_infer_abs_dlogp"]
    assert none_a == none_b  # routes are ignored
    r3_a = old_pass_dlogp(policy, batch, "r3")["train_infer_abs_dlogp"]
    r3_b = old_pass_dlogp(policy, perturbed, "r3")["train_infer_abs_dlogp"]
    assert r3_b > r3_a + 1e-3  # replayed routes change the log-probs
