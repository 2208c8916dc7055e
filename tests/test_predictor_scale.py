"""The served predictor's online scale and the Adam look-ahead predictor, against
straightforward references (pure torch)."""

from __future__ import annotations

import pytest
import torch

from trainer.algo.lookahead import adam_lookahead, router_lookahead
from trainer.algo.predictor_scale import ScaleFit, offset_fit_sums, parse_scale
from trainer.run.config import TrainConfig

E, H, T = 8, 16, 256


def drift_batches(persistence: float, batches: int, seed: int = 0):
    """Per batch: h, z_old, the predictor served (the previous batch's drift D_{t-1}) and the
    router's move D_t = persistence * D_{t-1} + sqrt(1 - p^2) * fresh (n = D_t h)."""
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(E, H, generator=g)
    for _ in range(batches):
        fresh = torch.randn(E, H, generator=g)
        move = persistence * prev + (1 - persistence**2) ** 0.5 * fresh
        h = torch.randn(T, H, generator=g)
        z = torch.randn(T, E, generator=g)
        yield [h], [z], [z + h @ move.T + 3.0], [prev]  # (+3: a per-token shift top-k ignores)
        prev = move


@pytest.mark.parametrize(("persistence", "lo", "hi"), [(1.0, 0.999, 1.0), (0.0, 0.0, 0.1)])
def test_auto_scale_recovers_persistent_and_independent_drift(persistence, lo, hi):
    """alpha ~ 1 when the drift repeats exactly, ~ 0 when each batch's drift is independent."""
    fit = ScaleFit("auto")
    assert fit.alpha == 0.0  # no evidence yet: R3
    for h, z, z_now, served in drift_batches(persistence, 20):
        fit.update(*offset_fit_sums(h, z, z_now, served, torch.ones(T)))
    assert lo <= fit.alpha <= hi, fit.alpha


def test_auto_scale_recovers_a_known_scale():
    """n = 0.6 b + independent noise: the fitted alpha is ~0.6 (within noise over 20 batches)."""
    fit = ScaleFit("auto")
    for h, z, z_now, served in drift_batches(0.6, 20, seed=1):
        fit.update(*offset_fit_sums(h, z, z_now, served, torch.ones(T)))
    assert abs(fit.alpha - 0.6) < 0.08, fit.alpha


def test_offset_fit_sums_reference_and_smoothing():
    g = torch.Generator().manual_seed(2)
    h, z, z1, w = (torch.randn(*s, generator=g) for s in ((5, H), (5, E), (5, E), (E, H)))
    mask = torch.tensor([1, 0, 1, 1, 0])
    b, n = (h @ w.T)[mask.bool()], (z1 - z)[mask.bool()]
    b, n = b - b.mean(-1, keepdim=True), n - n.mean(-1, keepdim=True)
    dot, sq = offset_fit_sums([h], [z], [z1], [w], mask)
    assert dot == pytest.approx(float((b * n).sum()), rel=1e-5)
    assert sq == pytest.approx(float((b * b).sum()), rel=1e-5)
    fit = ScaleFit("auto")
    assert fit.update(2.0, 4.0) == 0.5
    assert fit.update(1.0, 0.0) == pytest.approx((0.5 * 2 + 1) / (0.5 * 4 + 0))  # smoothed
    assert fit.update(-100.0, 1.0) == 0.0  # clipped to [0, 1]
    assert fit.update(0.0, 0.0) == 0.0  # no new evidence: the smoothed sums still say 0
    fixed = ScaleFit("0.25")
    assert fixed.update(5.0, 1.0) == 0.25


def test_scale_and_predictor_settings_are_checked():
    assert parse_scale("auto") == "auto" and parse_scale("0.5") == 0.5
    for bad in ("-1", "nan", "inf", "half"):
        with pytest.raises(ValueError, match="predictor_scale"):
            TrainConfig(predictor_scale=bad)
    with pytest.raises(ValueError, match="predictor"):
        TrainConfig(predictor="oracle")
    assert TrainConfig(predictor_scale="auto", predictor="lookahead").predictor_scale == "auto"


def test_lookahead_equals_hand_computed_adam_extrapolation():
    """After 3 Adam updates with known gradients, the look-ahead over a window of 3 mini-steps
    is mean(D_1 = 0, D_2, D_3) = (2 Delta_1 + Delta_2) / 3, Delta_j the update with the momentum
    decayed j times, v held, Adam's bias corrections at t + j; and it is what Adam itself does
    on zero gradients (whose v also decays: within 0.5 %)."""
    g = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(E, H, generator=g))
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = torch.optim.Adam([w], lr=lr, betas=(b1, b2), eps=eps)
    m, v = torch.zeros(E, H), torch.zeros(E, H)
    for _ in range(3):
        grad = torch.randn(E, H, generator=g)
        w.grad = grad.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
    t = 3

    def delta(j):
        m_hat = b1**j * m / (1 - b1 ** (t + j))
        v_hat = v / (1 - b2 ** (t + j))
        return -lr * m_hat / (v_hat.sqrt() + eps)

    want = (0 + 2 * delta(1) + delta(2)) / 3  # mean of D_1 = 0, D_2, D_3
    st = opt.state[w]
    got = adam_lookahead(st["exp_avg"], st["exp_avg_sq"], int(st["step"]), lr, (b1, b2), eps, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    [via] = router_lookahead(opt, [w], 3)
    torch.testing.assert_close(via, want)
    # Adam run forward on zero gradients: the router after 1 and 2 more updates
    w0 = w.detach().clone()
    seen = []
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        opt.step()
        seen.append(w.detach() - w0)
    real = (0 + seen[0] + seen[1]) / 3
    assert float((real - want).norm() / want.norm()) < 5e-3
    assert not adam_lookahead(m, v, t, lr, (b1, b2), eps, 1).any()  # on-policy: nothing
