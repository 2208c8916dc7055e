"""The served predictor's state in a checkpoint, so ``--resume`` continues every predictor
option: what the last push served (raw offset and scale), the scale fit's smoothed sums
(``--predictor-scale auto``) and the ridge fit's decayed sums (``--predictor ridge``). The
look-ahead needs nothing of its own: it is read from the routers' Adam state, which the
optimizer checkpoint holds. Tensors go to ``trainer_state.safetensors``, numbers to its JSON.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["predictor_state", "restore_predictor_state"]


def predictor_state(learner) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(json, tensors)`` of ``learner``'s served predictor, scale fit and ridge fit."""
    tensors = {f"served_raw.{i}": w.detach().cpu() for i, w in enumerate(learner.served.raw)}
    meta: dict[str, Any] = {
        "served_scale": learner.served.scale,
        "scale_fit": {
            "alpha": learner.scale.alpha,
            "dot": learner.scale.dot,
            "sq": learner.scale.sq,
        },
    }
    ridge = learner.ridge
    if ridge is not None:
        meta["ridge_count"] = ridge.count
        for i, (a, b) in enumerate(zip(ridge.a, ridge.b, strict=True)):
            tensors[f"ridge_a.{i}"], tensors[f"ridge_b.{i}"] = a.cpu(), b.cpu()
    return meta, tensors


def restore_predictor_state(learner, meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """Put what :func:`predictor_state` saved back into ``learner`` (a checkpoint without it,
    from before it was saved, keeps the learner's start-up state)."""
    from trainer.algo.predictor_scale import ServedPredictor

    if "served_scale" not in meta:
        return
    device = learner.policy.device
    raw = [tensors[f"served_raw.{i}"].to(device) for i in range(_count(tensors, "served_raw"))]
    learner.served = ServedPredictor(raw, meta["served_scale"])
    fit = meta["scale_fit"]
    learner.scale.alpha, learner.scale.dot, learner.scale.sq = fit["alpha"], fit["dot"], fit["sq"]
    if learner.ridge is not None and "ridge_count" in meta:
        n = _count(tensors, "ridge_a")
        learner.ridge.a = [tensors[f"ridge_a.{i}"] for i in range(n)]
        learner.ridge.b = [tensors[f"ridge_b.{i}"] for i in range(n)]
        learner.ridge.count = meta["ridge_count"]


def _count(tensors: dict, prefix: str) -> int:
    return sum(1 for k in tensors if k.startswith(prefix + "."))
