"""Diagnostics of a rollout batch that depend on the predictor the server routed with, when the
batch mixes samples of several weight versions (asynchronous rollouts, ``--max-staleness``).

The served route of a sample was chosen with the predictor of the sample's version; comparing it
with the trainer's prediction under another version's predictor would measure the predictor's
change, not the server. :func:`by_staleness` splits the tokens by their sample's staleness
(versions behind the trainer), computes a metric on each part with that version's predictor and
returns the token-weighted mean: with one part it is the metric itself. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["by_staleness"]


def by_staleness(
    metric: Callable[[list[torch.Tensor] | None, torch.Tensor], float],
    staleness: torch.Tensor,
    valid: torch.Tensor,
    predictors: Mapping[int, list[torch.Tensor] | None],
) -> float:
    """Token-weighted mean over the staleness values ``s`` present among the ``valid [B * T]``
    tokens of ``metric(predictors[s], mask of those tokens)``; ``staleness [B]`` per sample.

    ``metric`` must be a mean over the masked tokens (as
    :func:`trainer.algo.predictor.predictor_hit_rate` and
    :func:`~trainer.algo.predictor.predicted_route_agreement` are), so the weighted mean is the
    metric of the whole batch with each token's own predictor. A staleness with no predictor
    kept is an error (the history keeps ``max_staleness + 1``)."""
    b = staleness.shape[0]
    per_row = staleness.to(valid.device).reshape(b, 1).expand(b, valid.numel() // b).reshape(-1)
    valid = valid.reshape(-1).float()
    total, count = 0.0, 0.0
    for s in sorted({int(x) for x in per_row[valid > 0].tolist()}):
        if s not in predictors:
            raise KeyError(
                f"by_staleness: samples {s} version(s) old, "
                f"predictors kept for {sorted(predictors)}"
            )
        mask = valid * (per_row == s).float()
        n = float(mask.sum())
        total += metric(predictors[s], mask) * n
        count += n
    return total / count if count else 0.0
