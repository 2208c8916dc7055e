"""Router drift across batches: how consistently the routers move from one batch to the next.

PR2's predictor is fitted on one batch's router update and applied to a later rollout, so it can
only help when router updates keep pointing the same way. Per batch the trainer logs the cosine
between this batch's router update (``W_r(after) - W_r(before)``, all MoE layers flattened
together) and the update of 1, 2 and 3 batches before: ``router_drift_cos_lag1/2/3``. For a
random walk they are ~0; Adam's momentum alone makes lag 1 clearly positive, so lags 2-3 are
what tell persistent drift from momentum.

Pure functions over a history of updates, newest first (what :class:`trainer.run.policy.Policy`
keeps in ``router_deltas`` and checkpoints save).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from trainer.algo.predictor import drift_cosine

__all__ = ["LAGS", "history_from_tensors", "history_tensors", "lag_cosines", "push_update"]

#: The lags (in batches) whose drift cosine is logged.
LAGS: tuple[int, ...] = (1, 2, 3)

Update = Sequence[torch.Tensor]  # one router update: a tensor per MoE layer


def lag_cosines(
    history: Sequence[Update], current: Update, lags: Sequence[int] = LAGS
) -> dict[str, float | None]:
    """``{"router_drift_cos_lag<l>": cosine(current, history[l - 1])}``; None where the
    history is shorter than the lag (or an update is zero).

    >>> a, b = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]
    >>> lag_cosines([a, b], a, lags=(1, 2, 3))
    {'router_drift_cos_lag1': 1.0, 'router_drift_cos_lag2': 0.0, 'router_drift_cos_lag3': None}
    """
    return {
        f"router_drift_cos_lag{lag}": drift_cosine(
            history[lag - 1] if len(history) >= lag else None, current
        )
        for lag in lags
    }


def push_update(
    history: Sequence[Update], current: Update, keep: int = max(LAGS)
) -> list[list[torch.Tensor]]:
    """The history with ``current`` as its newest entry, at most ``keep`` updates long."""
    return [[t.detach() for t in current], *(list(u) for u in history)][:keep]


def _name(lag: int, layer: int) -> str:
    # lag 1 keeps the name checkpoints have always used for "the previous batch's update"
    return f"router_delta.{layer}" if lag == 1 else f"router_delta.lag{lag}.{layer}"


def history_tensors(history: Sequence[Update]) -> dict[str, torch.Tensor]:
    """The history as flat named CPU tensors (for a checkpoint's safetensors file)."""
    return {
        _name(lag, layer): t.detach().cpu().contiguous()
        for lag, update in enumerate(history, start=1)
        for layer, t in enumerate(update)
    }


def history_from_tensors(
    tensors: Mapping[str, torch.Tensor], num_layers: int
) -> list[list[torch.Tensor]]:
    """The history :func:`history_tensors` wrote (empty when none was saved); a checkpoint
    from before lags 2-3 gives its one update."""
    history = []
    for lag in range(1, max(LAGS) + 1):
        if _name(lag, 0) not in tensors:
            break
        history.append([tensors[_name(lag, layer)] for layer in range(num_layers)])
    return history
