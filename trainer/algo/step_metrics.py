"""What one batch's training reports (:meth:`trainer.algo.train_step.Learner.train_batch`):
train-inference agreement, PPO health, routing deviation (per mini-step and off-policy),
predictor hit rates and route agreement (with each sample's served predictor), router drift and
its lag-1..3 cosines.
Pure functions of the batch, the old pass and the mini-steps' log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pr2_serve.core.routing import deviation_histogram, route_misses
from trainer.algo.batch import Batch, flat_routes
from trainer.algo.drift import lag_cosines, push_update
from trainer.algo.ppo import PPOStats
from trainer.algo.predictor import (
    Select,
    plain_select,
    predicted_route_agreement,
    predictor_hit_rate,
)
from trainer.algo.version_metrics import by_staleness
from trainer.run.policy import Policy

if TYPE_CHECKING:
    from trainer.algo.old_pass import OldPass


@dataclass
class MiniStepLog:
    """What the mini-steps of one batch report."""

    stats: list[PPOStats] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    predictor_losses: list[float] = field(default_factory=list)
    hist: torch.Tensor | None = None  # routing deviation 0..k, every mini-step
    hist_off: torch.Tensor | None = None  # the same from mini-step 2 on (off-policy)
    zero_per_step: list[float] = field(default_factory=list)  # zero-deviation share per step
    offset_fit: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sum <b, n>, ||b||^2
    first_ratio_max_dev: float | None = None
    load_balance: list[float] = field(default_factory=list)  # Switch aux loss per mini-step
    # per MoE layer [rows, E]: each off-policy token's own mini-step router logits z_s
    step_logits: list[torch.Tensor] | None = None
    step_rows: torch.Tensor | None = None  # [rows] bool: rows step_logits holds

    def keep_step_logits(self, rows: torch.Tensor, logits: list[torch.Tensor], n: int) -> None:
        """Keep ``logits`` (per layer, ``[len(rows), E]``) as the rows' mini-step logits."""
        if self.step_logits is None:
            self.step_logits = [z.new_zeros(n, z.shape[-1]) for z in logits]
            self.step_rows = torch.zeros(n, dtype=torch.bool, device=logits[0].device)
        for kept, z in zip(self.step_logits, logits, strict=True):
            kept[rows] = z.detach()
        self.step_rows[rows] = True


def train_infer_metrics(batch: Batch, old_lp: torch.Tensor) -> dict:
    """Trainer (old pass) vs server log-probs on the generated tokens: mean |dlogp| and the KL
    estimate ``E[(r - 1) - log r]`` with ``r = pi_trainer / pi_server``."""
    lm = batch.loss_mask
    diff = (old_lp - batch.server_logprobs) * lm
    n_tok = lm.sum().clamp(min=1)
    log_r = old_lp - batch.server_logprobs  # trainer / server, on server samples
    return {
        "train_infer_abs_dlogp": float(diff.abs().sum() / n_tok),
        "train_infer_kl": float((((log_r.exp() - 1) - log_r) * lm).sum() / n_tok),
    }


@torch.no_grad()
def route_deviation(
    used: torch.Tensor,
    logits: list[torch.Tensor],
    valid: torch.Tensor,
    k: int,
    select: Select | None = None,
) -> torch.Tensor:
    """Histogram (0..k, summed over layers) of how many experts of the route used
    (``[rows, L, k]``: replayed, or the rollout's for ``none``) are not in the router's fresh
    selection in this forward (``select``: the family's, default plain top-k), over real
    positions."""
    used = used[valid]
    select = select or plain_select(k)
    hist = torch.zeros(k + 1, dtype=torch.long, device=used.device)
    for layer, z in enumerate(logits):
        fresh = select(layer, z.detach()[valid], None, None)
        hist += deviation_histogram(route_misses(used[:, layer], fresh), k)
    return hist


def predictor_metrics(
    policy: Policy,
    batch: Batch,
    old: OldPass,
    log: MiniStepLog,
    predictor_at_rollout: dict[int, list[torch.Tensor] | None],
) -> dict:
    """Hit rates of the trained, zero and served predictors, and the served routes' agreement
    with the trainer's own selection.

    A hit rate is the share of (token, layer) whose predicted top-k equals, as a set, the top-k
    of the token's own off-policy mini-step router logits ``z_s`` -- the target the predictors
    aim at (over the off-policy mini-steps: a mean over them). The ``_final`` ones compare with
    the routers after all the batch's updates instead (one step further than any mini-step)."""
    k, valid = policy.replay.top_k, batch.valid.reshape(-1)
    select = policy.replay.select  # each family's own selection rule
    routers = policy.router_weights()
    m = {}
    predictors = policy.predictor_parameters()
    h_old, z_old = old.hidden, old.logits
    final = [F.linear(h.float(), w.float()) for h, w in zip(h_old, routers, strict=True)]
    targets = {"": log.step_logits, "_final": final}
    for suffix, target in targets.items():
        mask = (
            valid if suffix else (None if log.step_rows is None else valid.bool() & log.step_rows)
        )
        if target is None:  # on-policy (one mini-step): nothing to predict
            m[f"predictor_hit_rate{suffix}"] = m[f"zero_predictor_hit_rate{suffix}"] = None
            m[f"rollout_predictor_hit_rate{suffix}"] = None
            continue
        m[f"predictor_hit_rate{suffix}"] = predictor_hit_rate(
            h_old, z_old, target, predictors, k, mask, select
        )
        m[f"zero_predictor_hit_rate{suffix}"] = predictor_hit_rate(
            h_old, z_old, target, None, k, mask, select
        )
        # out of sample: the predictor the server used for this rollout (trained on earlier
        # batches), of each sample's version (trainer.algo.version_metrics)
        m[f"rollout_predictor_hit_rate{suffix}"] = by_staleness(
            lambda wp, msk, target=target: predictor_hit_rate(
                h_old, z_old, target, wp, k, msk, select
            ),
            batch.staleness,
            mask,
            predictor_at_rollout,
        )
    # the server's routes vs the trainer's own top-k(z_old + W_p h_old) with the pushed predictor
    served = flat_routes(batch.routes)
    m["server_route_agreement"] = by_staleness(
        lambda wp, mask: predicted_route_agreement(served, h_old, z_old, wp or None, mask, select),
        batch.staleness,
        valid,
        predictor_at_rollout,
    )
    return m


def batch_metrics(
    policy: Policy,
    batch: Batch,
    old: OldPass,
    log: MiniStepLog,
    routers_before: list[torch.Tensor],
    predictor_at_rollout: dict[int, list[torch.Tensor] | None],
) -> dict:
    """PPO health, routing deviation, predictor hit rates and router drift of one batch (and
    this batch's router update added to ``policy.router_deltas``, for the next drift cosines)."""
    k, valid = policy.replay.top_k, batch.valid.reshape(-1)
    m = {
        "loss": float(np.mean([s.loss for s in log.stats])),  # this rank's share when sharded
        "clip_fraction": float(np.mean([s.clip_fraction for s in log.stats])),
        "approx_kl": float(np.mean([s.approx_kl for s in log.stats])),
        "first_ratio_mean": log.stats[0].ratio_mean,
        "grad_norm": float(np.mean(log.grad_norms)),
        "deviation_hist": log.hist.tolist(),
        "zero_deviation": float(log.hist[0] / log.hist.sum().clamp(min=1)),
        "zero_deviation_offpolicy": (
            float(log.hist_off[0] / log.hist_off.sum()) if log.hist_off.sum() else None
        ),
        "zero_deviation_per_mini_step": log.zero_per_step,  # mini-step 1, 2, ...
        # R2 vs R3 at theta_old: how many experts of the server's route (what R3 replays) are
        # not in the trainer's own top-k (what R2 replays: exactly so in r2/none, given the
        # server's routes below the layer in r3/pr2); mass above bin 0 = a train/inference
        # routing mismatch (e.g. a bf16 trainer vs an fp32 server)
        "r2_vs_r3_deviation_hist": route_deviation(
            flat_routes(batch.routes), old.logits, valid.bool(), k, policy.replay.select
        ).tolist(),
    }
    routers = policy.router_weights()
    m.update(predictor_metrics(policy, batch, old, log, predictor_at_rollout))
    delta = [w.detach() - w0 for w, w0 in zip(routers, routers_before, strict=True)]
    m["router_drift_rel"] = float(
        torch.cat([d.reshape(-1) for d in delta]).norm()
        / torch.cat([w.detach().reshape(-1) for w in routers_before]).norm().clamp(min=1e-12)
    )
    m.update(lag_cosines(policy.router_deltas, delta))
    policy.router_deltas = push_update(policy.router_deltas, delta)
    m["predictor_loss"] = float(np.mean(log.predictor_losses)) if log.predictor_losses else None
    dot, sq = log.offset_fit  # the served scale's evidence (trainer.algo.predictor_scale)
    m["predictor_scale_fit"] = dot / sq if sq > 0 else None  # this batch alone, unclipped
    m["load_balance"] = float(np.mean(log.load_balance)) if log.load_balance else None
    return m
