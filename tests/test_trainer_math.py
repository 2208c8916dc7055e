"""Trainer math against straightforward references (pure torch)."""

from __future__ import annotations

import pytest
import torch

from trainer.algo.ppo import grpo_advantages, ppo_loss
from trainer.algo.predictor import (
    drift_cosine,
    predicted_route_agreement,
    predictor_hit_rate,
    predictor_loss,
)
from trainer.data.tasks import Task, decode, exact_match


def test_grpo_advantages_reference():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    adv = grpo_advantages(r, group_size=4)
    for g in range(2):
        x = r[4 * g : 4 * g + 4]
        want = (x - x.mean()) / (x.std(unbiased=False) + 1e-6)
        torch.testing.assert_close(adv[4 * g : 4 * g + 4], want)
    assert torch.all(grpo_advantages(torch.ones(4), 4) == 0)


def test_ppo_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    b, t, eps = 6, 9, 0.2
    lp = torch.randn(b, t, generator=g) * 0.3 - 2
    old = lp + torch.randn(b, t, generator=g) * 0.2
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    loss, stats = ppo_loss(lp, old, adv, mask, eps)
    total, count, clipped = 0.0, 0, 0
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                ratio = float(torch.exp(lp[i, j] - old[i, j]))
                a = float(adv[i])
                total += -min(ratio * a, max(min(ratio, 1 + eps), 1 - eps) * a)
                count += 1
                clipped += abs(ratio - 1) > eps
    assert abs(float(loss) - total / count) < 1e-5
    assert abs(stats.clip_fraction - clipped / count) < 1e-6


def test_ratio_is_one_when_logprobs_equal():
    lp = torch.randn(3, 5)
    _loss, stats = ppo_loss(lp, lp.clone(), torch.ones(3), torch.ones(3, 5))
    assert stats.ratio_mean == 1.0 and stats.clip_fraction == 0.0 and stats.approx_kl == 0.0


def test_predictor_learns_a_known_router_drift():
    """Apply a known update to W_r; a few predictor steps cut KL-post by >= 50 % and beat the
    zero predictor's hit rate on the post-update routes."""
    g = torch.Generator().manual_seed(1)
    layers, t, h_dim, e, k = 2, 512, 32, 8, 2
    hs = [torch.randn(t, h_dim, generator=g) for _ in range(layers)]
    w_old = [torch.randn(e, h_dim, generator=g) * 0.3 for _ in range(layers)]
    drift = [torch.randn(e, h_dim, generator=g) * 0.15 for _ in range(layers)]
    w_new = [w + d for w, d in zip(w_old, drift, strict=True)]
    zs = [h @ w.T for h, w in zip(hs, w_old, strict=True)]
    z_new = [h @ w.T for h, w in zip(hs, w_new, strict=True)]  # the moved router's logits
    preds = [torch.zeros(e, h_dim, requires_grad=True) for _ in range(layers)]
    opt = torch.optim.Adam(preds, lr=0.05)
    start = float(predictor_loss("kl-post", hs, zs, z_new, preds))
    for _ in range(30):
        opt.zero_grad()
        loss = predictor_loss("kl-post", hs, zs, z_new, preds)
        loss.backward()
        opt.step()
    end = float(predictor_loss("kl-post", hs, zs, z_new, preds))
    assert end <= 0.5 * start, (start, end)
    hit = predictor_hit_rate(hs, zs, z_new, [p.detach() for p in preds], k)
    zero = predictor_hit_rate(hs, zs, z_new, None, k)
    assert hit > zero, (hit, zero)
    # l2 also learns the drift
    preds2 = [torch.zeros(e, h_dim, requires_grad=True) for _ in range(layers)]
    opt2 = torch.optim.Adam(preds2, lr=0.05)
    s2 = float(predictor_loss("l2", hs, zs, z_new, preds2))
    for _ in range(30):
        opt2.zero_grad()
        predictor_loss("l2", hs, zs, z_new, preds2).backward()
        opt2.step()
    assert float(predictor_loss("l2", hs, zs, z_new, preds2)) <= 0.5 * s2


def test_tasks_are_seeded_disjoint_and_scored_exactly():
    task = Task("addition,sort,count", digits=2)
    a, b = task.batch(50, seed=3), task.batch(50, seed=3)
    assert a == b and task.batch(50, seed=4) != a
    train = {p.prompt for p in task.batch(500, seed=0)}
    held = {p.prompt for p in task.batch(200, seed=0, split="eval")}
    assert not train & held
    p = a[0]
    good = [*list(p.answer.encode()), 256]
    assert exact_match(good, p.answer) == 1.0
    assert exact_match(list(p.answer.encode()), p.answer) == 0.0  # no EOS
    assert exact_match([*good[:-1], 48, 256], p.answer) == 0.0
    assert decode([104, 105, 256, 1]) == ("hi", True)


def test_drift_cosine_reference():
    """Consecutive router updates: same direction 1, opposite -1, orthogonal 0, none -> None."""
    a = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    assert drift_cosine(a, a) == pytest.approx(1.0)
    assert drift_cosine(a, [-x for x in a]) == pytest.approx(-1.0)
    assert drift_cosine([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 5.0])]) == 0.0
    assert drift_cosine(None, a) is None
    assert drift_cosine(a, [torch.zeros(1, 2), torch.zeros(1)]) is None
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    ref = float((x * y).sum() / (x.norm() * y.norm()))
    assert drift_cosine([x], [y]) == pytest.approx(ref, abs=1e-6)


def test_predicted_route_agreement_reference():
    """Served routes built from topk(z + W_p h) agree 100 %; order within a row is ignored;
    with the predictor left out, only the rows it did not change agree."""
    g = torch.Generator().manual_seed(3)
    t, h_dim, e, k = 256, 16, 8, 2
    hs = [torch.randn(t, h_dim, generator=g) for _ in range(2)]
    zs = [torch.randn(t, e, generator=g) for _ in range(2)]
    wp = [torch.randn(e, h_dim, generator=g) for _ in range(2)]
    served = torch.stack(
        [
            torch.topk(z + h @ w.T, k, -1).indices.flip(-1)
            for h, z, w in zip(hs, zs, wp, strict=True)
        ],
        1,
    ).to(torch.uint8)
    assert predicted_route_agreement(served, hs, zs, wp) == 1.0
    plain = [torch.topk(z, k, -1).indices.sort(-1).values for z in zs]
    ref = float(
        torch.stack(
            [(p == served[:, i].long().sort(-1).values).all(-1) for i, p in enumerate(plain)]
        )
        .float()
        .mean()
    )
    assert predicted_route_agreement(served, hs, zs, None) == pytest.approx(ref)
    assert ref < 0.9
    mask = torch.zeros(t)
    mask[:10] = 1
    assert predicted_route_agreement(served, hs, zs, wp, mask) == 1.0
