"""``--max-staleness 1`` against a real ``pr2-serve``: the run completes, rollouts lag by at most
one version, a version that advanced by 2 gets its stale groups dropped and counted, and the
route-agreement diagnostic uses the predictor each sample was served with.

The learner here keeps the policy fixed (lr 0) and pushes a different random predictor at every
version, so the served routes depend only on the predictor: with the sample's own version's
predictor the trainer reproduces them (agreement ~1), with the newest one it does not."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

import trainer.run.loop as loop
from tests.helpers import API_KEY
from trainer.algo.batch import flat_routes
from trainer.algo.old_pass import mini_step_groups, old_pass
from trainer.algo.predictor import predicted_route_agreement
from trainer.algo.train_step import Learner
from trainer.run.config import TrainConfig

pytestmark = pytest.mark.vllm


class NewPredictorEachPush(Learner):
    """Trains as usual (lr 0: the policy stays put), then draws a new random predictor, which
    the next push sends; records the agreement of each batch under the *newest* predictor."""

    def __init__(self, policy, cfg) -> None:
        super().__init__(policy, cfg)
        self.draws = 0
        self.with_newest: list[float | None] = []

    def train(self, batch, rollout_predictors=None) -> dict:
        if batch is None:
            self.with_newest.append(None)
        else:
            b = batch.to(self.policy.device)
            old = old_pass(self.policy, b, "pr2", mini_step_groups(b, 2), world=1)
            newest = [w.detach().clone() for w in self.policy.predictor_parameters()]
            self.with_newest.append(
                predicted_route_agreement(
                    flat_routes(b.routes), old.hidden, old.logits, newest, b.valid.reshape(-1)
                )
            )
        m = super().train(batch, rollout_predictors)
        self.draws += 1
        g = torch.Generator().manual_seed(self.draws)
        with torch.no_grad():
            for w in self.policy.predictor_parameters():
                w.copy_(torch.randn(w.shape, generator=g) * 3 / w.shape[1] ** 0.5)
        return m


@pytest.fixture(scope="module")
def server(zero_server):
    return zero_server  # the run starts on whatever version it serves


@pytest.mark.timeout(600)
def test_staleness_one_run(server, tiny_zero, tmp_path):
    from trainer.run.policy import Policy

    cfg = TrainConfig(
        servers=[server.http],
        model_dir=str(tiny_zero),
        replay="pr2",
        predictor="learned",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        max_tokens=4,
        lr=0.0,
        steps=4,
        eval_every=0,
        output_dir=str(tmp_path),
        api_key=API_KEY,
        max_staleness=1,
    )
    learner = NewPredictorEachPush(Policy.from_config(cfg), cfg)
    with loop.Trainer(cfg, log=lambda _: None, learner=learner) as trainer:
        push = trainer.push

        def push_twice_at_step_3(state_dict=None):  # a version that advances by 2
            # (the request made ahead reaches the server first: generated on the older version)
            cf.wait([f for _, f in trainer.async_rollouts.prefetcher._pending.values()])
            seconds = push(state_dict)
            if trainer.version == v0 + 3:
                seconds += push(state_dict)
            return seconds

        v0 = trainer.version
        trainer.push = push_twice_at_step_3
        rows = trainer.run()
    assert len(rows) == 4
    lags = [[m["weight_version"] - v for v in m["rollout_versions"]] for m in rows]
    assert lags == [[0], [1], [1], []]  # every kept sample at most one version old
    assert [m["rollout_lag_max"] for m in rows] == [0, 1, 1, None]
    assert [m["dropped_stale"] for m in rows] == [0, 0, 0, 8]  # step 4: 2 versions old
    # steps 2, 3: routed with the predictor of the version before (random, each different):
    # reproduced with it, not with the newest one
    for m, newest in zip(rows[1:3], learner.with_newest[1:3], strict=True):
        assert m["server_route_agreement"] >= 0.999, m["server_route_agreement"]
        assert newest < 0.9, newest
    assert rows[3]["pushed_version"] == v0 + 5
