"""The grouped (DeepSeek-V3 / GLM-4.5 ``noaux_tc``, DeepSeek-V2) and GPT-OSS routers of
:mod:`pr2_serve.core.routing` against a float64 numpy reference written from the definitions, one
token at a time, on random tie-free logits. Pure: no vLLM, no transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pr2_serve.core.routing import grouped_gate, grouped_route, grouped_select, pr2_route
from tests.devices import DEVICES


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_grouped(z, b, bias, k, groups, topk_group, renorm, scale, scoring):
    """Per token: rank groups (sum of the two best biased scores with a bias, else the best),
    keep ``topk_group``, take the top ``k`` biased scores inside; weights = plain scores."""
    score = _sigmoid if scoring == "sigmoid" else _softmax
    ids, weights = [], []
    for t in range(z.shape[0]):
        plain = score(z[t])
        choice = score(z[t] + b[t]) + (0.0 if bias is None else bias)
        per_group = choice.reshape(groups, -1)
        rank = np.sort(per_group, axis=1)[:, -2:].sum(1) if bias is not None else per_group.max(1)
        kept = np.argsort(-rank)[:topk_group]
        allowed = np.isin(np.arange(len(choice)) // per_group.shape[1], kept)
        chosen = [e for e in np.argsort(-choice) if allowed[e]][:k]
        w = plain[chosen]
        if renorm:
            w = w / w.sum()
        ids.append(chosen)
        weights.append(w * scale)
    return np.array(ids), np.array(weights)


def _random_layer(seed, tokens=41, hidden=64, experts=16, predictor_std=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w_r = torch.randn(experts, hidden, generator=g) * 0.25
    w_p = torch.randn(experts, hidden, generator=g) * predictor_std
    bias = torch.randn(experts, generator=g) * 0.1
    return h, h @ w_r.T, w_p, bias


def _sorted(ids, w):
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(w, order, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("scoring", "with_bias", "renorm", "scale", "k", "groups", "topk_group"),
    [
        ("sigmoid", True, True, 2.5, 4, 4, 2),  # DeepSeek-V3 / GLM-4.5 shape
        ("sigmoid", True, False, 1.0, 4, 4, 2),
        ("sigmoid", True, True, 1.0, 8, 8, 4),  # DeepSeek-V3's own 8 groups, 4 kept
        ("sigmoid", True, True, 1.5, 2, 1, 1),  # one group: plain biased top-k
        ("sigmoid", True, True, 1.0, 8, 1, 1),  # MiniMax-M2: ungrouped, top-8, renormalised
        ("softmax", False, False, 1.0, 4, 4, 2),  # DeepSeek-V2 group_limited_greedy
    ],
)
@pytest.mark.parametrize("predictor", ["zero", "random"])
def test_grouped_route_matches_float64_reference(
    device, scoring, with_bias, renorm, scale, k, groups, topk_group, predictor
):
    h, z, w_p, bias = _random_layer(seed=k * 10 + groups)
    if predictor == "zero":
        w_p = torch.zeros_like(w_p)
    bias = bias if with_bias else None
    b = (h.double() @ w_p.double().T).numpy()
    ref_ids, ref_w = reference_grouped(
        z.double().numpy(),
        b,
        None if bias is None else bias.double().numpy(),
        k,
        groups,
        topk_group,
        renorm,
        scale,
        scoring,
    )
    w, ids = grouped_route(
        h.to(device),
        z.to(device),
        w_p.to(device),
        k,
        renorm,
        num_groups=groups,
        topk_group=topk_group,
        scoring_func=scoring,
        correction_bias=None if bias is None else bias.to(device),
        routed_scaling_factor=scale,
    )
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    got_ids, got_w = _sorted(ids.cpu().long().numpy(), w.cpu().double().numpy())
    ref_ids, ref_w = _sorted(ref_ids, ref_w)
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got_w, ref_w, atol=1e-6, rtol=1e-5)


def test_the_predictor_moves_the_selection_and_only_the_selection():
    """A random predictor changes some routes; for every route, the weights are the plain
    sigmoid scores of whatever was chosen (predictor and correction bias play no part)."""
    h, z, w_p, bias = _random_layer(seed=7, tokens=200)
    kw = dict(num_groups=4, topk_group=2, correction_bias=bias, routed_scaling_factor=2.5)
    _, plain_ids = grouped_route(h, z, None, 4, True, **kw)
    w, ids = grouped_route(h, z, w_p, 4, True, **kw)
    moved = (plain_ids.sort(-1).values != ids.sort(-1).values).any(-1)
    assert 0 < int(moved.sum()) < 200
    s = z.sigmoid().gather(1, ids.long())
    torch.testing.assert_close(w, s / s.sum(-1, keepdim=True) * 2.5, atol=0, rtol=0)


def test_zero_predictor_is_bitwise_the_stock_grouped_router():
    """Zero predictor == no predictor == the family's own computation (written here as the
    DeepSeek-V3 / GLM-4.5 routers write it), bit for bit."""
    h, z, _, bias = _random_layer(seed=3, tokens=300)
    kw = dict(num_groups=4, topk_group=2, correction_bias=bias, routed_scaling_factor=2.5)
    w0, ids0 = grouped_route(h, z, torch.zeros(16, 64), 4, True, **kw)
    w1, ids1 = grouped_route(h, z, None, 4, True, **kw)
    assert torch.equal(ids0, ids1) and torch.equal(w0, w1)
    scores = z.sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, 4, 4).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=2, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(-1, 4, 4).reshape(-1, 16)
    stock_ids = torch.topk(choice.masked_fill(~mask.bool(), float("-inf")), 4, sorted=False)[1]
    stock_w = scores.gather(1, stock_ids)
    stock_w = stock_w / stock_w.sum(-1, keepdim=True) * 2.5
    assert torch.equal(ids0.long(), stock_ids) and torch.equal(w0, stock_w)


def test_select_and_gate_compose_to_the_route():
    h, z, w_p, bias = _random_layer(seed=5)
    ids = grouped_select(z, h, w_p, 4, 4, 2, "sigmoid", bias)
    w, ids_route = grouped_route(
        h, z, w_p, 4, False, num_groups=4, topk_group=2, correction_bias=bias
    )
    assert torch.equal(ids.int(), ids_route)
    assert torch.equal(grouped_gate(z, ids, False), w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("predictor", ["zero", "random"])
def test_gpt_oss_route_matches_float64_reference(device, predictor):
    """GPT-OSS: the logits hold the router's bias; select top-k of ``z + b_r + W_p h``,
    softmax over the selected plain ``z + b_r``."""
    h, z, w_p, bias = _random_layer(seed=11, experts=32)
    if predictor == "zero":
        w_p = torch.zeros_like(w_p)
    logits = z + bias  # what the GPT-OSS router's Linear (with bias) returns
    zb = logits.double().numpy()
    sel = zb + (h.double() @ w_p.double().T).numpy()
    ref_ids = np.argsort(-sel, axis=-1)[:, :4]
    ref_w = np.stack([_softmax(zb[t, ref_ids[t]]) for t in range(zb.shape[0])])
    w, ids = pr2_route(h.to(device), logits.to(device), w_p.to(device), 4, renormalize=True)
    got_ids, got_w = _sorted(ids.cpu().long().numpy(), w.cpu().double().numpy())
    ref_ids, ref_w = _sorted(ref_ids, ref_w)
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got_w, ref_w, atol=1e-6, rtol=1e-5)
    if predictor == "zero":
        stock = torch.topk(logits, 4, dim=-1).indices  # the HF GPT-OSS router
        assert torch.equal(ids.cpu().long().sort(-1).values, stock.sort(-1).values)


def test_compiled_grouped_route_equals_eager():
    """The CUDA plugin runs the grouped router compiled (``fullgraph=True``: a graph break
    would raise); same selection and weights as eager, one graph over token counts."""
    from pr2_serve.core.routing import compiled

    route = compiled(grouped_route)
    kw = dict(num_groups=4, topk_group=2, routed_scaling_factor=2.5)
    for tokens in (1, 7, 64, 200):
        h, z, w_p, bias = _random_layer(seed=tokens, tokens=tokens)
        w_c, ids_c = route(h, z, w_p, 4, True, correction_bias=bias, **kw)
        w_e, ids_e = grouped_route(h, z, w_p, 4, True, correction_bias=bias, **kw)
        assert torch.equal(ids_c.sort(-1).values, ids_e.sort(-1).values)
        order_c, order_e = ids_c.argsort(-1), ids_e.argsort(-1)
        torch.testing.assert_close(w_c.gather(-1, order_c), w_e.gather(-1, order_e))
