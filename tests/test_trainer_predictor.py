"""The predictor's training in the trainer (pure torch, tiny model, no server): what it is
fitted to, and when."""

from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.distributed import synthetic_batch
from trainer.policy import Policy
from trainer.replay import RoutingControl
from trainer.train_step import mini_step_groups, train_batch


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
    m = train_batch(policy, batch, cfg, MoveRouters(policy, deltas), pred_opt)
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
