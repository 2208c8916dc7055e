"""The predictor study's pure parts: the ridge rule against numpy, the counterfactual scorer
(R3 exactly for the zero predictor; the in-sample bound on top), the lr keyed to the router's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from trainer.algo.ridge import RidgeFit, centred_move, ridge_solve
from trainer.experiments.counterfactual import (
    HalfPreviousDrift,
    InSampleRidge,
    Learned,
    Lookahead,
    RandomMatched,
    Ridge,
    Stream,
    Zero,
    paired_difference,
    score,
)
from trainer.run.config import TrainConfig


def synthetic_stream(seed: int = 0, batches: int = 12, steps: int = 4, noise: float = 0.3):
    """A linear router drifting by a persistent ``Δ`` (plus per-batch noise) each update."""
    g = torch.Generator().manual_seed(seed)
    layers, hidden, experts, n, k = 2, 8, 6, 64, 2
    w = torch.randn(layers, experts, hidden, generator=g, dtype=torch.float64)
    delta = 0.08 * torch.randn(layers, experts, hidden, generator=g, dtype=torch.float64)
    hs, zs, routers = [], [], []
    for _ in range(batches):
        d = delta + noise * 0.08 * torch.randn(delta.shape, generator=g, dtype=torch.float64)
        h = torch.randn(layers, n, hidden, generator=g, dtype=torch.float64)
        routers.append(w.clone())
        zs.append(
            torch.stack([torch.einsum("lnh,leh->lne", h, w + s * d) for s in range(steps + 1)])
        )
        hs.append(h)
        w = w + steps * d
    return Stream(
        h=torch.stack(hs),
        z=torch.stack(zs),
        routers=torch.stack(routers),
        lookahead=torch.zeros_like(torch.stack(routers)),
        top_k=k,
        router_lr=0.01,
    )


def test_ridge_solve_equals_lstsq_with_the_penalty():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 4))
    lam_rel = 0.7
    a, b = x.T @ x / 50, x.T @ y / 50
    lam = lam_rel * np.trace(a) / 6
    # ridge as least squares on rows augmented with sqrt(lam * 50) I
    xa = np.vstack([x, np.sqrt(lam * 50) * np.eye(6)])
    ya = np.vstack([y, np.zeros((6, 4))])
    ref = np.linalg.lstsq(xa, ya, rcond=None)[0].T
    got = ridge_solve(torch.from_numpy(a), torch.from_numpy(b), lam_rel).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_ridge_fit_decays_earlier_batches():
    g = torch.Generator().manual_seed(1)
    fit = RidgeFit(strength=0.5, memory=0.25)
    batches = []
    for _ in range(3):
        h = torch.randn(20, 8, generator=g)
        z0, zs = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
        fit.add([h], [z0], [zs], torch.ones(20))
        fit.end_batch()
        batches.append((h.double(), centred_move(z0, zs)))
    weights = [0.25**2, 0.25, 1.0]
    a = sum(w * h.T @ h for w, (h, _) in zip(weights, batches, strict=True))
    b = sum(w * h.T @ n for w, (h, n) in zip(weights, batches, strict=True))
    ref = ridge_solve(a / (20 * sum(weights)), b / (20 * sum(weights)), 0.5)
    got = fit.weights([torch.zeros(4, 8)])[0]
    torch.testing.assert_close(got.double(), ref.float().double(), rtol=1e-5, atol=1e-6)


def test_zero_predictor_scores_r3_exactly():
    st = synthetic_stream()
    sc = score(st, Zero(), first=0)
    k = st.top_k
    for t in range(st.h.shape[0]):
        for s in range(st.steps):
            a = np.sort(st.z[t, 0].numpy().argsort(-1)[..., -k:], -1)
            b = np.sort(st.z[t, s].numpy().argsort(-1)[..., -k:], -1)
            assert sc["exact"][t, s] == pytest.approx((a == b).all(-1).mean(), abs=1e-12)
    assert (sc["exact"][:, 0] == 1.0).all()  # mini-step 1: the router has not moved


def test_in_sample_ridge_bounds_every_predictor_on_a_synthetic_stream():
    st = synthetic_stream(noise=0.3)
    preds = [Zero(), Learned(0.3), Learned(3.0), Learned(1.0, "l2"), Ridge(1.0, 0.5)]
    preds += [Lookahead(), HalfPreviousDrift(), RandomMatched(Ridge(1.0, 0.5)), InSampleRidge()]
    off = {p.name: score(st, p)["exact"][:, 1:].mean() for p in preds}
    best = off.pop(InSampleRidge.name)
    assert all(best >= v for v in off.values()), (best, off)
    # a persistent drift is forecast: ridge beats R3 out of sample
    assert off[Ridge(1.0, 0.5).name] > off[Zero.name]


def test_paired_difference_of_identical_runs_is_zero():
    runs = [(np.array([0.9, 0.8, 0.85]),) * 2, (np.array([0.7, 0.75]),) * 2]
    d = paired_difference(runs)
    assert d["mean"] == 0 and d["ci95"] == [0.0, 0.0]


def test_predictor_lr_is_keyed_to_the_routers(tiny_zero):
    from trainer.run.policy import Policy, make_policy_optimizer, make_predictor_optimizer

    cfg = TrainConfig(
        replay="pr2",
        predictor="learned",
        lr=2e-4,
        router_lr_multiplier=30.0,
        predictor_lr_ratio=0.1,
        servers=["http://unused"],
    )
    policy = Policy(str(tiny_zero))
    router_lr = make_policy_optimizer(policy, cfg).param_groups[1]["lr"]
    pred = make_predictor_optimizer(policy, cfg)
    assert pred.param_groups[0]["lr"] == pytest.approx(0.1 * router_lr)
    assert router_lr == pytest.approx(2e-4 * 30)
    wd = make_predictor_optimizer(
        policy, TrainConfig(predictor="learned", predictor_weight_decay=0.01, servers=["x"])
    )
    assert isinstance(wd, torch.optim.AdamW) and wd.param_groups[0]["weight_decay"] == 0.01
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = TrainConfig(predictor_lr_multiplier=10.0, router_lr_multiplier=30.0, servers=["x"])
    assert old.predictor_lr_ratio == pytest.approx(1 / 3)
    assert any("deprecated" in str(w.message) for w in caught)


def test_shadow_predictor_is_what_pr2_trains(tiny_zero, tmp_path):
    """The recorder's shadow learned predictor at ratio c, trained beside the run, equals the
    predictor ``--replay pr2 --predictor-lr-ratio c`` trains on the same batch (the served
    routes come with the batch, so the first batch's forwards are the same in both)."""
    from trainer.algo.train_step import Learner
    from trainer.experiments.drift_record import DriftRecorder
    from trainer.run.distributed import synthetic_batch
    from trainer.run.policy import Policy

    cfg = TrainConfig(
        replay="pr2",
        predictor="learned",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        lr=1e-3,
        predictor_lr_ratio=0.3,
        servers=["http://unused"],
    )
    policy = Policy(str(tiny_zero))
    learner = Learner(policy, cfg)
    rec = DriftRecorder(learner, tmp_path / "s.npz", tokens=8, sequences=2)
    learner.observers.append(rec)
    learner.train(synthetic_batch(policy))
    trained = torch.stack([w.detach() for w in policy.predictor_parameters()])
    shadow = torch.from_numpy(np.load(tmp_path / "s.npz")["shadow:kl c=0.3"][0])
    assert trained.abs().max() > 0
    torch.testing.assert_close(shadow, trained, rtol=1e-4, atol=1e-7)


def test_counterfactual_page_matches_its_results():
    """docs/counterfactual.md is what the script makes of the committed results file."""
    import json
    from pathlib import Path

    from trainer.experiments.counterfactual_report import METHOD, findings, markdown

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "results/counterfactual/results.json").read_text())["rows"]
    page = (root / "docs/counterfactual.md").read_text()
    want = markdown(rows, {"method": METHOD, "findings": findings(rows)})
    assert page == want, "docs/counterfactual.md is stale: run counterfactual_run score"
