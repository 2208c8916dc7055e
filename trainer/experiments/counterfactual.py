"""The paired counterfactual: every predictor scored on the same recorded drift.

A stream (:mod:`trainer.experiments.drift_record`) holds, per batch ``t`` and MoE layer, a token
sample's router inputs ``h``, the logits at the rollout ``z_1 = z_old`` and in every later
mini-step ``z_s``. A predictor serves ``W_p`` for batch ``t`` having seen batches ``< t`` only
(as on the server); its routes ``topk(z_old + W_p h, k)`` are scored against ``topk(z_s, k)`` in
each mini-step ``s``:

- exact: the share of (token, layer) whose route equals the router's top-k as a set (the
  zero-deviation the grid reports; Qwen3/verl's ``replay_topk_accuracy`` is the overlap);
- overlap: the mean share of the route's ``k`` experts that are in the router's top-k.

R3 is the zero predictor, so ``diff = metric(P) - metric(zero)`` per batch is a paired,
seed-matched difference. First-order: a predictor's own effect on training (other routes, other
gradients) is not in the stream; that is what the online cells measure.

The learned predictors take Adam steps on the sample (one per off-policy mini-step, as in the
trainer) at ``c x`` the run's router lr. Pure torch/numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.algo.ridge import centred_move, ridge_solve

__all__ = [
    "SERVED_AHEAD",
    "HalfPreviousDrift",
    "InSampleRidge",
    "Learned",
    "Lookahead",
    "RandomMatched",
    "Recorded",
    "Ridge",
    "RidgeFull",
    "Scaled",
    "Stream",
    "Zero",
    "direction_cosine",
    "paired_difference",
    "score",
    "served_lookahead",
]


@dataclass
class Stream:
    h: torch.Tensor  # [N, L, n, H]
    z: torch.Tensor  # [N, S + 1, L, n, E]: index s - 1 = mini-step s; index S = after the batch
    routers: torch.Tensor  # [N, L, E, H] before each batch
    lookahead: torch.Tensor  # [N, L, E, H] served for batch t + 1
    top_k: int
    router_lr: float
    # recorded on the WHOLE batch by the run itself (drift_record): per batch the ridge sums
    # [N, L, H, H] / [N, L, H, E] / [N], and each shadow learned predictor after the batch
    ridge_a: torch.Tensor | None = None
    ridge_b: torch.Tensor | None = None
    ridge_n: torch.Tensor | None = None
    shadows: dict[str, torch.Tensor] | None = None

    @classmethod
    def load(cls, path) -> Stream:
        a = np.load(path)
        names = ("h", "z", "routers", "lookahead", "ridge_a", "ridge_b", "ridge_n")
        t = {k: torch.from_numpy(a[k]).double() for k in names if k in a.files}
        shadows = {
            k[len("shadow:") :]: torch.from_numpy(a[k]).double()
            for k in a.files
            if k.startswith("shadow:")
        }
        return cls(**t, top_k=int(a["top_k"]), router_lr=float(a["router_lr"]), shadows=shadows)

    @property
    def steps(self) -> int:  # S, the mini-steps per batch
        return self.z.shape[1] - 1

    def moves(self, t: int) -> torch.Tensor:
        """The centred router moves of batch ``t``'s off-policy mini-steps, ``[S-1, L, n, E]``."""
        return centred_move(self.z[t, :1], self.z[t, 1 : self.steps])


# -- predictors: predict(stream, t) -> W [L, E, H] for batch t; observe(stream, t) after --------
class Zero:
    name = "zero (R3)"

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        return torch.zeros_like(st.routers[t])

    def observe(self, st: Stream, t: int) -> None:
        pass


class Learned:
    """The paper's predictor: Adam on ``W_p`` at ``c x`` the router's lr, one step per
    off-policy mini-step on the loss ``kind``: ``kl`` (``KL(sg softmax z_s || softmax(z_old +
    W_p h))``), ``l2`` (``MSE(W_p h, z_s - z_old)``) or ``kl-margin`` (KL weighted per token by
    ``min(w_max, 1 / margin)``, margin = the gap between the k-th and (k+1)-th logit of
    ``z_old``: tokens near the top-k boundary count more). ``gate``: per-layer factors on the
    served offset (a depth gate damps later layers)."""

    def __init__(self, c: float, kind: str = "kl", gate=None, w_max: float = 10.0, wd=0.0):
        self.c, self.kind, self.gate, self.w_max, self.wd = c, kind, gate, w_max, wd
        gated = "" if gate is None else ", depth-gated"
        self.name = f"learned {kind} c={c:g}{gated}"
        self.w = self.opt = None

    def start(self, like: torch.Tensor, router_lr: float) -> None:
        """``W_p = 0`` shaped ``like`` (``[L, E, H]``) and its optimiser."""
        self.w = torch.zeros_like(like, requires_grad=True)
        self.opt = torch.optim.AdamW([self.w], lr=self.c * router_lr, weight_decay=self.wd)

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        if self.w is None:
            self.start(st.routers[t], st.router_lr)
        w = self.w.detach()
        return w if self.gate is None else w * torch.as_tensor(self.gate)[:, None, None]

    def observe(self, st: Stream, t: int) -> None:
        for s in range(1, st.steps):  # mini-steps 2..S
            self.step(st.h[t], st.z[t, 0], st.z[t, s], st.top_k)

    def step(self, h, z_old, z_s, k: int) -> None:
        """One Adam step towards the logits ``z_s`` (``[L, n, E]``; ``h [L, n, H]``)."""
        pred = z_old + torch.einsum("lnh,leh->lne", h, self.w)
        loss = self._loss(pred, z_s, z_old, k)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def _loss(self, pred, target, z_old, k):
        if self.kind == "l2":
            return ((pred - target) ** 2).mean(-1).mean(-1).sum()
        per_tok = F.kl_div(
            F.log_softmax(pred, -1), F.log_softmax(target, -1), log_target=True, reduction="none"
        ).sum(-1)  # [L, n]
        if self.kind == "kl":
            return per_tok.mean(-1).sum()
        top = z_old.topk(k + 1, -1).values
        w = torch.clamp(1.0 / (top[..., k - 1] - top[..., k]).clamp(min=1e-6), max=self.w_max)
        return ((per_tok * w).sum(-1) / w.sum(-1)).sum()


class Ridge:
    """:class:`trainer.algo.ridge.RidgeFit`'s rule on the sample: sums of batches ``< t``,
    decayed."""

    def __init__(self, strength: float, memory: float):
        self.strength, self.memory = strength, memory
        self.name = f"ridge (sample) λ={strength:g} memory={memory:g}"
        self.a = self.b = None
        self.count = 0.0

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        if self.a is None:
            return torch.zeros_like(st.routers[t])
        return torch.stack(
            [
                ridge_solve(a / self.count, b / self.count, self.strength)
                for a, b in zip(self.a, self.b, strict=True)
            ]
        )

    def observe(self, st: Stream, t: int) -> None:
        a, b, n = self.sums(st, t)
        g = self.memory
        self.a = a if self.a is None else g * self.a + a
        self.b = b if self.b is None else g * self.b + b
        self.count = g * self.count + n

    def sums(self, st: Stream, t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Batch ``t``'s sums: here the token sample's (:func:`batch_sums`)."""
        return batch_sums(st, t)


class Recorded(Zero):
    """A predictor the run trained alongside itself on the whole batch (a shadow: it never
    served): ``W`` after batch ``t - 1`` serves batch ``t``; ``gate`` as in :class:`Learned`."""

    def __init__(self, key: str, gate=None):
        self.key, self.gate = key, gate
        self.name = f"learned {key}" + ("" if gate is None else ", depth-gated")

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        if t == 0:
            return torch.zeros_like(st.routers[0])
        w = st.shadows[self.key][t - 1]
        return w if self.gate is None else w * torch.as_tensor(self.gate)[:, None, None]


class RidgeFull(Ridge):
    """:class:`Ridge` on the whole batches' sums, as ``--predictor ridge`` fits them."""

    def __init__(self, strength: float, memory: float):
        super().__init__(strength, memory)
        self.name = f"ridge λ={strength:g} memory={memory:g}"

    def sums(self, st: Stream, t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        return st.ridge_a[t], st.ridge_b[t], float(st.ridge_n[t])


def batch_sums(st: Stream, t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Sums of ``h h^T`` ``[L, H, H]`` and ``h n^T`` ``[L, H, E]`` over batch ``t``'s off-policy
    mini-steps' tokens, and their count."""
    h, moves = st.h[t], st.moves(t)  # [L, n, H], [S-1, L, n, E]
    reps = moves.shape[0]
    a = reps * torch.einsum("lnh,lng->lhg", h, h)
    b = torch.einsum("lnh,slne->lhe", h, moves)
    return a, b, float(reps * h.shape[1])


class InSampleRidge:
    """The upper bound: ridge fitted on the scored batch's own moves (it sees the future)."""

    name = "in-sample ridge (bound)"

    def __init__(self, strength: float = 1e-3):
        self.strength = strength

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        if st.ridge_a is not None:  # the whole batch's own moves
            a, b, n = st.ridge_a[t], st.ridge_b[t], float(st.ridge_n[t])
        else:
            a, b, n = batch_sums(st, t)
        return torch.stack(
            [ridge_solve(x / n, y / n, self.strength) for x, y in zip(a, b, strict=True)]
        )

    def observe(self, st: Stream, t: int) -> None:
        pass


class Lookahead(Zero):
    """The Adam look-ahead the live run computed after batch ``t - 1``: its forecast of the mean
    move over the off-policy mini-steps 2..S (``--predictor lookahead`` serves ``(S - 1) / S``
    of it, the mean over all S: :func:`served_lookahead`)."""

    name = "look-ahead, off-policy mean"

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        return st.lookahead[t - 1] if t > 0 else torch.zeros_like(st.routers[t])


class HalfPreviousDrift(Zero):
    """½ x the previous batch's router update: with a constant drift ``Δ`` per mini-step the
    mean move over mini-steps 2..S is ``(S/2) Δ`` = ½ x a batch's update."""

    name = "½ previous drift"

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        return 0.5 * (st.routers[t] - st.routers[t - 1]) if t > 0 else super().predict(st, t)


class RandomMatched(Zero):
    """Control: a random offset with, per layer, the norm of ``ref``'s (does perturbing routes
    by that much help on its own?)."""

    def __init__(self, ref, seed: int = 0):
        self.ref, self.g = ref, torch.Generator().manual_seed(seed)
        self.name = f"random, {ref.name}'s norm (control)"

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        ref = self.ref.predict(st, t)
        r = torch.randn(ref.shape, generator=self.g, dtype=ref.dtype)
        scale = ref.flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp(min=1e-12)
        return r * scale[:, None, None]

    def observe(self, st: Stream, t: int) -> None:
        self.ref.observe(st, t)


# -- scoring -------------------------------------------------------------------------------------
class Scaled(Zero):
    """``alpha x`` another predictor's offset (how far along the forecast to go)."""

    def __init__(self, inner, alpha: float):
        self.inner, self.alpha = inner, alpha
        self.name = f"{inner.name} x{alpha:g}"

    def predict(self, st: Stream, t: int) -> torch.Tensor:
        return self.alpha * self.inner.predict(st, t)

    def observe(self, st: Stream, t: int) -> None:
        self.inner.observe(st, t)


SERVED_AHEAD = "look-ahead (--predictor lookahead)"


def served_lookahead(st: Stream) -> Scaled:
    """What ``--predictor lookahead`` serves: the mean over all S mini-steps (``D_1 = 0``)."""
    p = Scaled(Lookahead(), (st.steps - 1) / st.steps)
    p.name = SERVED_AHEAD
    return p


def direction_cosine(st: Stream, t: int, w: torch.Tensor) -> float | None:
    """Cosine between the offsets ``W_p h`` and the router's mean off-policy move on batch
    ``t``'s sample (both centred over experts; all tokens and layers as one vector): does the
    predictor point where the router goes? None for a zero offset."""
    off = torch.einsum("lnh,leh->lne", st.h[t], w)
    off = off - off.mean(-1, keepdim=True)
    move = st.moves(t).mean(0)
    na, nb = off.norm(), move.norm()
    if na == 0 or nb == 0:
        return None
    return float((off * move).sum() / (na * nb))


def route_scores(st: Stream, t: int, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Exact-set agreement and top-k overlap of batch ``t``'s predicted routes with each
    mini-step's router, ``[S]`` each."""
    k = st.top_k
    ids = (st.z[t, 0] + torch.einsum("lnh,leh->lne", st.h[t], w)).topk(k, -1).indices
    pred = torch.zeros_like(st.z[t, 0], dtype=torch.bool).scatter_(-1, ids, True)
    exact, overlap = [], []
    for s in range(st.steps):
        tgt_ids = st.z[t, s].topk(k, -1).indices
        tgt = torch.zeros_like(pred).scatter_(-1, tgt_ids, True)
        common = (pred & tgt).sum(-1).double()  # [L, n]
        exact.append(float((common == k).double().mean()))
        overlap.append(float((common / k).mean()))
    return np.array(exact), np.array(overlap)


def score(st: Stream, predictor, first: int = 2) -> dict[str, np.ndarray]:
    """Run ``predictor`` through the stream; ``exact``/``overlap`` ``[N - first, S]`` from batch
    ``first`` on (every predictor has seen the same history by then)."""
    exact, overlap, cosine = [], [], []
    for t in range(st.h.shape[0]):
        w = predictor.predict(st, t)
        if t >= first:
            e, o = route_scores(st, t, w)
            exact.append(e)
            overlap.append(o)
            cosine.append(direction_cosine(st, t, w))
        predictor.observe(st, t)
    cos = [c for c in cosine if c is not None]
    return {
        "exact": np.array(exact),
        "overlap": np.array(overlap),
        "cosine": float(np.mean(cos)) if cos else None,
    }


def paired_difference(
    runs: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 2000, seed: int = 0
) -> dict:
    """Seed-matched difference: ``runs`` = per seed (per-batch metric of P, of R3); the mean
    over seeds of each seed's mean batch difference, with a 95 % interval resampling batches
    within each seed (percentile bootstrap)."""
    rng = np.random.default_rng(seed)
    diffs = [np.asarray(p) - np.asarray(r) for p, r in runs]
    mean = float(np.mean([d.mean() for d in diffs]))
    boots = np.zeros(n_boot)
    for d in diffs:
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boots += d[idx].mean(1)
    boots /= len(diffs)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    per_seed = [float(d.mean()) for d in diffs]
    return {"mean": mean, "ci95": [float(lo), float(hi)], "per_seed": per_seed}
