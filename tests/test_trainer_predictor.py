"""The predictor's training in the trainer (pure torch, tiny model, no server): what it is
fitted to, and when."""

from __future__ import annotations

import torch

from trainer.algo.old_pass import mini_step_groups
from trainer.algo.replay import RoutingControl
from trainer.algo.train_step import Learner
from trainer.run.config import TrainConfig
from trainer.run.distributed import synthetic_batch
from trainer.run.policy import Policy


class MoveRouters:
    """A stand-in policy optimizer: every step moves each router by a fixed ``delta`` (and
    nothing else), so the router's move per mini-step is known exactly."""

    def __init__(self, policy: Policy, deltas: list[torch.Tensor]) -> None:
        self.policy, self.deltas = policy, deltas

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.policy.policy_parameters():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for router, d in zip(self.policy.replay.routers, self.deltas, strict=True):
            router.weight.add_(d)


def test_predictor_learns_one_mini_step_move_not_two(tiny_zero):
    """Off-policy 2, the router moving by Delta per update: mini-step 2's forward sees the
    router after ONE update, so the reference-timed predictor regresses on Delta h (the old
    timing, after opt.step(), regressed on the router after two updates: 2 Delta h).

    One plain-SGD predictor step from zero with the l2 loss gives, per layer,
    ``W_p = lr * 2 / (E * N) * sum_t n_t h_t^T`` over mini-step 2's N real tokens, where
    ``n_t`` is the target move; on the first MoE layer (its input no router changes)
    ``n_t = Delta h_t`` exactly: ``W_p = lr * 2 / (E * N) * Delta @ H^T H``."""
    policy = Policy(str(tiny_zero))
    batch = synthetic_batch(policy)
    g = torch.Generator().manual_seed(3)
    deltas = [0.05 * torch.randn(r.weight.shape, generator=g) for r in policy.replay.routers]
    cfg = TrainConfig(
        replay="pr2",
        predictor_loss="l2",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        servers=["http://unused"],
    )
    lr = 0.1
    pred_opt = torch.optim.SGD(policy.predictor_parameters(), lr=lr)
    ctl = RoutingControl(record=True)  # h of the first MoE layer: the same in every forward
    with torch.no_grad(), policy.replay.control(ctl):
        policy.model(input_ids=batch.input_ids)
    learner = Learner(policy, cfg)
    learner.opt, learner.pred_opt = MoveRouters(policy, deltas), pred_opt
    m, _ = learner.train_batch(batch)
    assert m["predictor_loss"] > 0
    # mini-step 1 replays the routes at theta_old; mini-step 2's router has moved by Delta
    first, second = m["zero_deviation_per_mini_step"]
    assert first == 1.0 and second < 1.0, m["zero_deviation_per_mini_step"]
    t = batch.input_ids.shape[1]
    gidx = mini_step_groups(batch, 2)[1]  # mini-step 2's groups -> its real rows
    samples = (gidx[:, None] * 2 + torch.arange(2)).reshape(-1)
    rows = (samples[:, None] * t + torch.arange(t)).reshape(-1)
    rows = rows[batch.valid.reshape(-1)[rows].bool()]
    h = ctl.hidden[0][rows]
    e = deltas[0].shape[0]
    one = lr * 2 / (e * len(rows)) * deltas[0] @ (h.T @ h)
    got = policy.predictor_parameters()[0].detach()
    err_one = float((got - one).norm() / one.norm())
    err_two = float((got - 2 * one).norm() / (2 * one).norm())
    assert err_one < 1e-4 and err_two > 0.4, (err_one, err_two)


def small_cfg(**kw) -> TrainConfig:
    kw.setdefault("predictor", "learned")
    return TrainConfig(
        replay="pr2",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        lr=1e-3,
        servers=["http://unused"],
        **kw,
    )


def test_served_predictor_is_scaled_and_pushed(tiny_zero):
    """--predictor-scale 0.5: the trainer keeps training W_p, the push carries 0.5 W_p, and
    the next batch's diagnostics compare with what was served."""
    from trainer.algo.train_step import Learner

    policy = Policy(str(tiny_zero))
    batch = synthetic_batch(policy)
    learner = Learner(policy, small_cfg(predictor_scale="0.5", predictor_lr_ratio=10))
    m = learner.train(batch)
    assert m["predictor_scale"] == 0.5 and m["predictor_scale_served"] == 1.0
    trained = [w.detach() for w in policy.predictor_parameters()]
    assert max(float(w.abs().max()) for w in trained) > 0
    tensors = policy.checkpoint_tensors(True, None, learner.served_predictors())
    for name, w in zip(policy.replay.predictor_state_dict(), trained, strict=True):
        torch.testing.assert_close(tensors[name], 0.5 * w)
    m2 = learner.train(batch)
    assert m2["predictor_scale_served"] == 0.5 and m2["predictor_scale_fit"] is not None


def test_lookahead_predictor_serves_the_routers_adam_extrapolation(tiny_zero):
    """--predictor lookahead --predictor-scale auto: nothing trained, the served predictor is
    alpha x the routers' Adam look-ahead, alpha in [0, 1] fitted from the second batch on."""
    from trainer.algo.lookahead import router_lookahead
    from trainer.algo.train_step import Learner

    policy = Policy(str(tiny_zero))
    batch = synthetic_batch(policy)
    learner = Learner(policy, small_cfg(predictor="lookahead", predictor_scale="auto"))
    assert learner.pred_opt is None
    rows = [learner.train(batch) for _ in range(3)]
    assert all(r["predictor_loss"] is None for r in rows)
    assert rows[0]["predictor_scale_fit"] is None  # the first rollout's predictor was zero
    assert rows[2]["predictor_scale_fit"] is not None
    assert all(0.0 <= r["predictor_scale"] <= 1.0 for r in rows)
    ahead = router_lookahead(learner.opt, [r.weight for r in policy.replay.routers], 2)
    assert max(float(a.abs().max()) for a in ahead) > 0
    for got, a in zip(learner.served_predictors(), ahead, strict=True):
        torch.testing.assert_close(got, rows[-1]["predictor_scale"] * a)
