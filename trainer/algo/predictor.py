"""Evolution-predictor losses and hit rate (PR2 paper Eq. 7-8). Pure torch.

Per MoE layer, from the old-logprob pass: router inputs ``h_old [T, H]`` and logits
``z_old = W_r^old h_old [T, E]``. In off-policy mini-step ``s`` the forward's own router logits
``z_s`` (the router after ``s - 1`` updates, applied to this forward's input: upstream layers'
changes included) are the target; the predictor ``W_p`` should make ``z_old + W_p h_old`` pick
the experts the router picks there (the reference code's ``COMPUTE_PREDICTIVE_LOSS`` branch,
computed in the forward, before the optimizer step, on that mini-step's tokens):

- ``kl-post``: ``KL( sg(softmax(z_s)) || softmax(z_old + W_p h_old) )``, mean over tokens,
  summed over layers (the paper's / reference code's default). For a sigmoid router (DeepSeek-V3,
  GLM-4.5: each expert's score ``sigmoid(z_e)`` on its own, no distribution over experts) the
  same divergence taken per expert: ``sum_e KL( Bern(sg(sigmoid(z_s,e))) ||
  Bern(sigmoid(z_old,e + (W_p h_old)_e)) )`` -- zero exactly when every score the selection
  ranks is matched (the correction bias is added to both alike), where a softmax over sigmoid
  logits would be a surrogate blind to a shift shared by all experts;
- ``l2``: ``MSE(W_p h_old, z_s - z_old)`` (regress the logit drift directly, any router).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pr2_serve.core.routing import select_experts, selection_scores

#: ``select(layer, z, h, w_p) -> ids [T, k]``: a MoE layer's selection as its family makes it
#: (:meth:`trainer.algo.replay.MoEReplay.select`; plain ``topk(z + W_p h)`` when not given).
Select = Callable[[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def plain_select(top_k: int) -> Select:
    """The softmax-top-k families' selection (``topk(z + W_p h, k)``)."""
    return lambda layer, z, h, w_p: select_experts(z, h, w_p, top_k)


__all__ = [
    "bernoulli_kl",
    "drift_cosine",
    "predicted_route_agreement",
    "predictor_hit_rate",
    "predictor_loss",
]


def predictor_loss(
    kind: str,
    h_old: Sequence[torch.Tensor],
    z_old: Sequence[torch.Tensor],
    target_logits: Sequence[torch.Tensor],
    predictor_weights: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    count: torch.Tensor | float | None = None,
    scoring: Sequence[str] | None = None,
) -> torch.Tensor:
    """Sum over layers of the per-token mean loss; gradients reach only the predictors.

    ``target_logits``: per layer ``[T, E]`` the router logits to predict (a mini-step's own
    ``z_s``, detached here). ``count``: the mean's divisor when ``mask`` holds only a share of
    the tokens (a data-parallel rank's); default ``mask.sum()``. ``scoring``: per layer the
    router's scores, ``"softmax"`` (default) or ``"sigmoid"`` (``kl-post`` then compares each
    expert's score: module docstring)."""
    total = torch.zeros((), dtype=torch.float32, device=predictor_weights[0].device)
    scoring = scoring or ["softmax"] * len(predictor_weights)
    layers = zip(h_old, z_old, target_logits, predictor_weights, scoring, strict=True)
    for h, z, z_s, w_p, score in layers:
        h, z, target = h.detach().float(), z.detach().float(), z_s.detach().float()
        pred = selection_scores(z, h, w_p.float())
        if kind == "kl-post" and score == "sigmoid":
            per_tok = bernoulli_kl(target, pred).sum(-1)
        elif kind == "kl-post" and score == "softmax":
            per_tok = F.kl_div(
                F.log_softmax(pred, -1),
                F.log_softmax(target, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
        elif kind == "kl-post":
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {score!r}")
        elif kind == "l2":
            per_tok = ((pred - target) ** 2).mean(-1)
        else:
            raise ValueError(f"predictor loss must be 'kl-post' or 'l2', got {kind!r}")
        total = total + _masked_mean(per_tok, mask, count)
    return total


def bernoulli_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL( Bern(sigmoid(target)) || Bern(sigmoid(logits)) )`` from logits, in
    log-sigmoids (no ``log(0)`` for saturated scores)."""
    p = torch.sigmoid(target_logits)
    log_p, log_not_p = F.logsigmoid(target_logits), F.logsigmoid(-target_logits)
    log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    return p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)


@torch.no_grad()
def predictor_hit_rate(
    h_old: Sequence[torch.Tensor],
    z_old: Sequence[torch.Tensor],
    target_logits: Sequence[torch.Tensor],
    predictor_weights: Sequence[torch.Tensor] | None,
    top_k: int,
    mask: torch.Tensor | None = None,
    select: Select | None = None,
) -> float:
    """Share of (token, layer) whose predicted selection (on ``z_old + W_p h_old``; ``W_p = 0``
    when ``predictor_weights`` is None) equals, as a set, the selection on ``target_logits``
    (per layer ``[T, E]``): each token's own off-policy mini-step logits ``z_s`` (what the
    predictor aims at), or the router after the batch applied to ``h_old`` (the ``_final``
    diagnostics). ``select``: the family's selection (default: plain top-k)."""
    select = select or plain_select(top_k)
    predicted, actual = [], []
    for i, (h, z, target) in enumerate(zip(h_old, z_old, target_logits, strict=True)):
        w_p = _layer(predictor_weights, i)
        predicted.append(select(i, z.float(), h.float(), w_p))
        actual.append(select(i, target.float(), None, None))
    return _set_agreement(predicted, actual, mask)


@torch.no_grad()
def predicted_route_agreement(
    routes: torch.Tensor,
    h_old: Sequence[torch.Tensor],
    z_old: Sequence[torch.Tensor],
    predictor_weights: Sequence[torch.Tensor] | None,
    mask: torch.Tensor | None = None,
    select: Select | None = None,
) -> float:
    """Share of (token, layer) where the served route ``routes [T, L, k]`` equals, as a set,
    the selection on ``z_old + W_p h_old`` computed by the trainer (``W_p = 0`` when None;
    ``select``: the family's, default plain top-k).

    With the predictor the server used for the rollout this must be ~1: it checks end to end
    that the pushed predictor reached the right layers of the server and is applied there the
    way the trainer applies it.
    """
    select = select or plain_select(routes.shape[-1])
    predicted = [
        select(i, z.float(), h.float(), _layer(predictor_weights, i))
        for i, (h, z) in enumerate(zip(h_old, z_old, strict=True))
    ]
    return _set_agreement(predicted, [routes[:, i] for i in range(len(predicted))], mask)


def _layer(weights: Sequence[torch.Tensor] | None, i: int) -> torch.Tensor | None:
    return None if weights is None else weights[i].float()


def _set_agreement(
    ids_a: Sequence[torch.Tensor], ids_b: Sequence[torch.Tensor], mask: torch.Tensor | None
) -> float:
    """Share of (token, layer) whose expert ids ``[T, k]`` in ``ids_a`` and ``ids_b`` are equal
    as sets, over the tokens where ``mask [T]`` is set (all when None)."""
    hits, count = 0.0, 0.0
    for a, b in zip(ids_a, ids_b, strict=True):
        same = (a.long().sort(-1).values == b.long().sort(-1).values).all(-1).float()
        m = torch.ones_like(same) if mask is None else mask.float()
        hits += float((same * m).sum())
        count += float(m.sum())
    return hits / max(count, 1.0)


def drift_cosine(
    previous: Sequence[torch.Tensor] | None, current: Sequence[torch.Tensor]
) -> float | None:
    """Cosine between two router updates (all layers flattened together).

    ``current`` is ``W_r(after batch t) - W_r(before batch t)``, ``previous`` the same for batch
    t-1. PR2's predictor is trained on one batch's drift and applied to the next rollout, so it
    can only help when consecutive drifts point the same way (cosine clearly > 0); for a random
    walk the cosine is ~0. None when there is no previous update or one of them is zero.

    >>> drift_cosine([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])  # doctest: +ELLIPSIS
    0.707...
    """
    if previous is None:
        return None
    a = torch.cat([x.detach().float().reshape(-1) for x in previous])
    b = torch.cat([x.detach().float().reshape(-1) for x in current])
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    return float(a @ b / (na * nb))


def _masked_mean(
    x: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor | float | None = None
) -> torch.Tensor:
    if mask is None:
        return x.mean() if count is None else x.sum() / count
    m = mask.to(x.dtype)
    denom = m.sum() if count is None else torch.as_tensor(count, dtype=x.dtype, device=x.device)
    return (x * m).sum() / denom.clamp(min=1)
