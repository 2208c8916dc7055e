"""Router drift at lags 1-3 (trainer/algo/drift.py) and the Switch load-balancing loss
(trainer/algo/load_balance.py): pure functions against straightforward references, and their wiring
into a training batch (no server)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.algo.drift import history_from_tensors, history_tensors, lag_cosines, push_update
from trainer.algo.load_balance import load_balance_loss
from trainer.algo.train_step import Learner
from trainer.run.config import TrainConfig
from trainer.run.distributed import synthetic_batch
from trainer.run.policy import Policy


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# -- drift -----------------------------------------------------------------------------------------
def test_lag_cosines_against_flattened_reference():
    g = torch.Generator().manual_seed(0)
    updates = [[torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)] for _ in range(5)]
    flat = [torch.cat([t.reshape(-1) for t in u]) for u in updates]
    history: list = []
    seen = []
    for i, u in enumerate(updates):
        m = lag_cosines(history, u)
        seen.append(m)
        for lag in (1, 2, 3):
            got = m[f"router_drift_cos_lag{lag}"]
            if i < lag:
                assert got is None
            else:
                assert got == pytest.approx(_cos(flat[i], flat[i - lag]), abs=1e-6)
        history = push_update(history, u)
        assert len(history) == min(i + 1, 3)
    assert set(seen[-1]) == {f"router_drift_cos_lag{lag}" for lag in (1, 2, 3)}


def test_constant_drift_has_cosine_one_and_alternating_minus_one():
    d = [torch.ones(2, 2)]
    hist = push_update(push_update(push_update([], d), [-t for t in d]), d)  # newest: d
    m = lag_cosines(hist, [-t for t in d])
    assert m["router_drift_cos_lag1"] == pytest.approx(-1.0)
    assert m["router_drift_cos_lag2"] == pytest.approx(1.0)
    assert m["router_drift_cos_lag3"] == pytest.approx(-1.0)


def test_history_round_trips_through_named_tensors():
    hist = [[torch.full((2, 3), float(lag * 10 + layer)) for layer in range(4)] for lag in (1, 2)]
    tensors = history_tensors(hist)
    assert "router_delta.0" in tensors and "router_delta.lag2.3" in tensors  # lag 1: old name
    back = history_from_tensors(tensors, 4)
    assert len(back) == 2
    for a, b in zip(hist, back, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert history_from_tensors({}, 4) == []


# -- load balance ----------------------------------------------------------------------------------
def reference_switch_loss(logits, ids, mask) -> float:
    """E * sum_e f_e P_e per layer, summed, by loops over tokens."""
    total = 0.0
    for z, idx in zip(logits, ids, strict=True):
        t_n, e_n = z.shape
        k = idx.shape[1]
        real = [t for t in range(t_n) if mask[t]]
        probs = torch.softmax(z.double(), -1)
        f = [sum(int(e in idx[t].tolist()) for t in real) / (len(real) * k) for e in range(e_n)]
        p = [sum(float(probs[t, e]) for t in real) / len(real) for e in range(e_n)]
        total += e_n * sum(fe * pe for fe, pe in zip(f, p, strict=True))
    return total


def test_load_balance_matches_reference_and_bounds():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(10, 8, generator=g) * 2 for _ in range(3)]
    ids = [torch.topk(z, 2, -1).indices for z in logits]
    mask = torch.ones(10)
    mask[7:] = 0
    got = float(load_balance_loss(logits, ids, mask))
    assert got == pytest.approx(reference_switch_loss(logits, ids, mask), rel=1e-5)
    # uniform router and perfectly spread routes: 1 per layer; all tokens on one expert: ~E
    z = torch.zeros(8, 4)
    spread = torch.arange(8).remainder(4)[:, None]
    assert float(load_balance_loss([z, z], [spread, spread])) == pytest.approx(2.0)
    peaked = torch.zeros(8, 4)
    peaked[:, 0] = 50.0
    assert float(load_balance_loss([peaked], [torch.zeros(8, 1, dtype=torch.long)])) == (
        pytest.approx(4.0, rel=1e-4)
    )


def test_load_balance_gradient_moves_probability_off_the_overloaded_expert():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(32, 16, generator=g)
    router = torch.nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = h.mean(0) * 5  # expert 0 favoured
    z = router(h)
    ids = torch.topk(z, 1, -1).indices
    loss = load_balance_loss([z], [ids])
    loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        router.weight -= 0.5 * router.weight.grad
        p_after = torch.softmax(router(h), -1).mean(0)
    assert p_after[0] < torch.softmax(z.detach(), -1).mean(0)[0]


# -- wiring ----------------------------------------------------------------------------------------
def _learner(model_dir, **kw) -> Learner:
    cfg = TrainConfig(
        servers=["http://unused"],
        model_dir=str(model_dir),
        replay="r3",
        off_policy_steps=2,
        prompts_per_batch=4,
        samples_per_prompt=2,
        lr=1e-3,
        **kw,
    )
    return Learner(Policy(str(model_dir), seed=0), cfg)


def test_batch_logs_lag_cosines_and_the_load_balance_loss_moves_the_router(tiny_random):
    plain, lb = _learner(tiny_random), _learner(tiny_random, load_balance_coef=1.0)
    batch = synthetic_batch(plain.policy)
    rows = [plain.train(batch) for _ in range(4)]
    assert rows[0]["router_drift_cos_lag1"] is None and "router_drift_cos_prev" not in rows[0]
    assert rows[1]["router_drift_cos_lag1"] is not None and rows[1]["router_drift_cos_lag2"] is None
    assert all(rows[3][f"router_drift_cos_lag{lag}"] is not None for lag in (1, 2, 3))
    assert len(plain.policy.router_deltas) == 3
    # the loss value is logged in every mode; with a coefficient it changes the update
    m = lb.train(batch)
    assert m["load_balance"] == pytest.approx(
        rows[0]["load_balance"], rel=0.05
    )  # mini-step 2 differs
    assert m["load_balance"] >= 4 * 0.99  # >= 1 per MoE layer (4 layers)
    fresh = _learner(tiny_random)
    fresh.train(batch)
    diff = [
        float((a - b).abs().max())
        for a, b in zip(lb.policy.router_weights(), fresh.policy.router_weights(), strict=True)
    ]
    assert max(diff) > 0


def test_load_balance_coef_is_a_config_field():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert "load_balance_coef" in names
    with pytest.raises(ValueError, match="load_balance_coef"):
        TrainConfig(load_balance_coef=-1.0)
