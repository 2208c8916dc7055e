"""The learned predictor's ``kl-post`` loss for sigmoid routers (DeepSeek-V3, GLM-4.5): the
divergence per expert between the target's and the prediction's sigmoid scores, against a
float64 reference; the softmax routers keep the softmax KL."""

from __future__ import annotations

import numpy as np
import torch

from trainer.algo.predictor import bernoulli_kl, predictor_loss

T, H, E = 23, 16, 12


def _layers(seed: int, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    h = [torch.randn(T, H, generator=g) for _ in range(n)]
    z = [torch.randn(T, E, generator=g) * 2 for _ in range(n)]
    z_s = [x + torch.randn(T, E, generator=g) * 0.5 for x in z]
    w_p = [torch.randn(E, H, generator=g) * 0.1 for _ in range(n)]
    return h, z, z_s, w_p


def _reference(h, z, z_s, w_p, mask) -> float:
    """Float64: per layer, the mean over masked tokens of the sum over experts of
    ``p log(p/q) + (1-p) log((1-p)/(1-q))``, ``p = sigmoid(z_s)``, ``q = sigmoid(z + W_p h)``;
    summed over layers."""
    total = 0.0
    m = mask.numpy().astype(np.float64)
    for hh, zz, tt, ww in zip(h, z, z_s, w_p, strict=True):
        pred = zz.double().numpy() + hh.double().numpy() @ ww.double().numpy().T
        p = 1 / (1 + np.exp(-tt.double().numpy()))
        q = 1 / (1 + np.exp(-pred))
        kl = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(-1)
        total += float((kl * m).sum() / m.sum())
    return total


def test_sigmoid_loss_matches_float64_reference():
    h, z, z_s, w_p = _layers(0)
    mask = torch.arange(T) % 3 != 0
    got = predictor_loss("kl-post", h, z, z_s, w_p, mask, scoring=["sigmoid", "sigmoid"])
    ref = _reference(h, z, z_s, w_p, mask)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # a layer of each kind: the softmax layer's term is the softmax KL, unchanged
    mixed = predictor_loss("kl-post", h, z, z_s, w_p, mask, scoring=["sigmoid", "softmax"])
    softmax_only = predictor_loss("kl-post", h[1:], z[1:], z_s[1:], w_p[1:], mask)
    sig_only = _reference(h[:1], z[:1], z_s[:1], w_p[:1], mask)
    np.testing.assert_allclose(float(mixed), sig_only + float(softmax_only), rtol=1e-5)


def test_sigmoid_loss_sees_a_shift_the_softmax_kl_cannot():
    """A drift that raises every expert's logit alike changes every sigmoid score (and which
    experts clear a correction bias), but not the softmax: the surrogate would call it fitted."""
    h, z, _, _ = _layers(1, n=1)
    zero = [torch.zeros(E, H)]
    shifted = [z[0] + 0.7]
    softmax = predictor_loss("kl-post", h, z, shifted, zero)
    sigmoid = predictor_loss("kl-post", h, z, shifted, zero, scoring=["sigmoid"])
    assert float(softmax) < 1e-6 < 1e-2 < float(sigmoid)
    assert float(predictor_loss("kl-post", h, z, z, zero, scoring=["sigmoid"])) < 1e-6


def test_bernoulli_kl_is_finite_for_saturated_scores():
    target = torch.tensor([-120.0, -30.0, 0.0, 30.0, 120.0])
    got = bernoulli_kl(target, target.flip(0))
    assert torch.isfinite(got).all() and (got[[0, 1, 3, 4]] > 10).all() and got[2] == 0


def test_training_on_the_sigmoid_loss_fits_the_drift():
    h, z, z_s, _ = _layers(2, n=1)
    w_p = [torch.zeros(E, H, requires_grad=True)]
    opt = torch.optim.Adam(w_p, lr=5e-2)
    start = float(predictor_loss("kl-post", h, z, z_s, w_p, scoring=["sigmoid"]))
    for _ in range(200):
        opt.zero_grad()
        predictor_loss("kl-post", h, z, z_s, w_p, scoring=["sigmoid"]).backward()
        opt.step()
    assert float(predictor_loss("kl-post", h, z, z_s, w_p, scoring=["sigmoid"])) < 0.5 * start
