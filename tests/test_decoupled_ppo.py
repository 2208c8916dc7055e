"""Decoupled PPO (stale samples of asynchronous rollouts) against a loop over tokens, and its
reduction to today's loss when every sample is fresh (``--max-staleness 0``)."""

from __future__ import annotations

import math

import torch

from trainer.algo.ppo import behaviour_logprobs, decoupled_ppo_loss, ppo_loss


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 9
    lp = torch.randn(b, t, generator=g) * 0.3 - 2
    prox = lp + torch.randn(b, t, generator=g) * 0.2
    behav = prox + torch.randn(b, t, generator=g) * 0.8  # some weights above the cap
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    return lp, prox, behav, adv, mask


def test_decoupled_loss_matches_loop_reference():
    lp, prox, behav, adv, mask = _inputs()
    eps, cap = 0.2, 2.0
    loss, _ = decoupled_ppo_loss(lp, prox, behav, adv, mask, eps, weight_cap=cap)
    total, count, capped = 0.0, 0, 0
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            if not mask[i, j]:
                continue
            count += 1
            r = math.exp(float(lp[i, j] - prox[i, j]))
            w = math.exp(float(prox[i, j] - behav[i, j]))
            if w > cap:
                w, capped = 0.0, capped + 1
            a = float(adv[i])
            total += -w * min(r * a, max(min(r, 1 + eps), 1 - eps) * a)
    assert capped > 0  # the cap is exercised
    assert abs(float(loss) - total / count) < 1e-5
    # the gradient: w is a constant (no gradient through prox or behav)
    x = lp.clone().requires_grad_()
    decoupled_ppo_loss(x, prox, behav, adv, mask, eps, weight_cap=cap)[0].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_no_cap_keeps_every_weight():
    lp, prox, behav, adv, mask = _inputs(1)
    loss, _ = decoupled_ppo_loss(lp, prox, behav, adv, mask, 0.2, weight_cap=None)
    w = (prox - behav).exp()
    r = (lp - prox).exp()
    a = adv[:, None]
    want = (-torch.minimum(r * a, r.clamp(0.8, 1.2) * a) * w * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)


def test_fresh_samples_give_todays_loss_exactly():
    """Every sample fresh (staleness 0, as with --max-staleness 0): the behaviour log-probs are
    the proximal ones, w = 1, and loss, gradient and stats equal ppo_loss's bit for bit."""
    lp, prox, _behav, adv, mask = _inputs(2)
    server = prox + 0.3  # a server/trainer numerical gap: ignored for fresh samples
    behav = behaviour_logprobs(server, prox, torch.zeros(lp.shape[0]))
    assert torch.equal(behav, prox)
    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    new, new_st = decoupled_ppo_loss(a, prox, behav, adv, mask, 0.2, normalizer=7.0)
    old, old_st = ppo_loss(b, prox, adv, mask, 0.2, normalizer=7.0)
    new.backward()
    old.backward()
    assert torch.equal(new, old) and new_st == old_st
    assert torch.equal(a.grad, b.grad)


def test_stale_samples_use_the_servers_logprobs():
    _, prox, *_ = _inputs(3)
    server = prox - 0.5
    staleness = torch.tensor([0, 1, 0, 2, 0, 0])
    behav = behaviour_logprobs(server, prox, staleness)
    for i, s in enumerate(staleness.tolist()):
        assert torch.equal(behav[i], server[i] if s else prox[i])
