"""Online shrinkage of the served predictor (``--predictor-scale auto|FLOAT``; beyond the paper).

The server selects with ``topk(z + alpha * b)``, ``b = W_p h`` the raw predictor's offset (or
the Adam look-ahead's, :mod:`trainer.algo.lookahead`); the trainer keeps training the unscaled
``W_p``. ``auto`` fits ``alpha`` after each batch from what the batch recorded anyway: over
tokens, layers and the off-policy mini-steps ``s >= 2``,

    alpha = clip( sum <b, n_s> / sum ||b||^2 , 0, 1 ),   n_s = z_s - z_old,

the least-squares scale of the offset against the router's actual move by mini-step ``s``
(``z_s``: that mini-step's forward logits, ``z_old``: the old pass's, on the same rows). Both
are centred over experts first (top-k ignores a per-token shift). ``b`` is the **raw** offset
of the predictor the rollout was served with (``W_p`` trained on earlier batches: out of
sample), not the served ``alpha_prev * b``: the fitted value is then directly the scale to put
on the raw predictor at the next push, it does not depend on ``alpha_prev`` (no feedback), and
a batch served with ``alpha = 0`` (R3) still measures how good the predictor would have been.
The two sums are smoothed over batches (exponential, ``SMOOTHING`` per batch) and their ratio
clipped: ``alpha -> 1`` for persistent drift, ``-> 0`` (= R3) when drift is unpredictable.
Until there is evidence (a zero offset) ``alpha`` stays 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["SMOOTHING", "ScaleFit", "ServedPredictor", "offset_fit_sums", "parse_scale"]

#: Weight of the previous batches' sums at each update (0: the latest batch alone).
SMOOTHING = 0.5


def parse_scale(value: str | float) -> str | float:
    """``"auto"``, or a float >= 0 (``--predictor-scale``); a clear error otherwise."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    if not 0.0 <= alpha < float("inf"):
        raise ValueError(f"predictor_scale must be 'auto' or a number >= 0, got {value!r}")
    return alpha


@torch.no_grad()
def offset_fit_sums(
    h_old: Sequence[torch.Tensor],
    z_old: Sequence[torch.Tensor],
    z_now: Sequence[torch.Tensor],
    offset_weights: Sequence[torch.Tensor],
    mask: torch.Tensor,
) -> tuple[float, float]:
    """``(sum <b, n>, sum ||b||^2)`` over the masked rows and the layers, with
    ``b = W h_old`` (``offset_weights`` W per layer) and ``n = z_now - z_old``, both centred
    over experts. Rows: ``[T, H]`` / ``[T, E]`` per layer, ``mask [T]``."""
    dot, sq = 0.0, 0.0
    m = mask.bool()
    for h, z0, z1, w in zip(h_old, z_old, z_now, offset_weights, strict=True):
        b = h[m].float() @ w.float().T
        n = z1.detach()[m].float() - z0[m].float()
        b = b - b.mean(-1, keepdim=True)
        n = n - n.mean(-1, keepdim=True)
        dot += float((b * n).sum())
        sq += float((b * b).sum())
    return dot, sq


@dataclass
class ScaleFit:
    """The served predictor's scale: fixed (a float) or fitted online (``"auto"``)."""

    setting: str | float
    alpha: float = 0.0  # auto: the scale the next push serves
    dot: float = 0.0  # smoothed sum <b, n>
    sq: float = 0.0  # smoothed sum ||b||^2

    def __post_init__(self) -> None:
        self.setting = parse_scale(self.setting)
        if self.setting != "auto":
            self.alpha = float(self.setting)

    def update(self, dot: float, sq: float, smoothing: float = SMOOTHING) -> float:
        """Add one batch's sums (:func:`offset_fit_sums`); the scale to serve next."""
        self.dot = smoothing * self.dot + dot
        self.sq = smoothing * self.sq + sq
        if self.setting == "auto" and self.sq > 0:
            self.alpha = min(max(self.dot / self.sq, 0.0), 1.0)
        return self.alpha


@dataclass
class ServedPredictor:
    """What a push served: the raw predictor (``W_p``, or the look-ahead offset) and its scale;
    the server selects with ``scale * raw``."""

    raw: list[torch.Tensor] = field(default_factory=list)
    scale: float = 1.0

    def weights(self) -> list[torch.Tensor]:
        return [self.scale * w for w in self.raw]
