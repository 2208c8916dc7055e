"""Training on one rollout batch, as named phases (the method: ``docs/method.md``):

1. :func:`trainer.algo.old_pass.old_pass` -- log-probs at theta_old (no grad): replaying the
   server's routes (r3, pr2), recording its own routes (r2), natural routing (none); keeps the
   router inputs and logits (``h_old``, ``z_old``) per MoE layer;
2. ``off_policy_steps`` x :meth:`Learner.mini_step` -- the clipped objective on a slice of the
   groups, replaying per mode; from mini-step 2 on a :func:`predictor_step` (pr2) inside the
   same mini-step, before its policy update (the reference code's order): target = that
   forward's own router logits ``z_s`` on that mini-step's tokens;
3. :func:`trainer.algo.step_metrics.batch_metrics` -- PPO health, routing deviation, predictor
   hit rates, router drift.

:meth:`Learner.train_batch` composes them; data-parallel training (``torchrun``) is the same
code on a shard of each mini-step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.algo.batch import Batch, flat_routes
from trainer.algo.load_balance import load_balance_loss
from trainer.algo.lookahead import router_lookahead
from trainer.algo.old_pass import OldPass, group_rows, mini_step_groups, old_pass, replayed_routes
from trainer.algo.ppo import PPOStats, behaviour_logprobs, decoupled_ppo_loss
from trainer.algo.predictor import predictor_loss
from trainer.algo.predictor_scale import ScaleFit, ServedPredictor, offset_fit_sums
from trainer.algo.replay import RoutingControl
from trainer.algo.ridge import RidgeFit
from trainer.algo.step_metrics import (
    MiniStepLog,
    batch_metrics,
    route_deviation,
    train_infer_metrics,
)
from trainer.run.config import TrainConfig
from trainer.run.policy import (
    Policy,
    forward_logprobs,
    full_tensor,
    make_policy_optimizer,
    make_predictor_optimizer,
)


# -- 2. mini-steps ---------------------------------------------------------------------------------
@dataclass
class PredictorFit:
    """What an off-policy pr2 mini-step needs to fit the predictor on its own tokens."""

    kind: str  # cfg.predictor_loss
    h_old: list[torch.Tensor]  # per MoE layer, the mini-step's rows (this rank's share)
    z_old: list[torch.Tensor]
    valid: torch.Tensor  # [rows] real positions
    count: torch.Tensor  # real positions of the whole mini-step (all ranks): the mean's divisor
    opt: torch.optim.Optimizer
    world: int


def predictor_step(policy: Policy, fit: PredictorFit, z_s: list[torch.Tensor]) -> float:
    """One predictor update: ``L_p = KL(sg(softmax(z_s)) || softmax(z_old + W_p h_old))``
    (``cfg.predictor_loss``; per expert on sigmoid scores for the sigmoid routers) over the
    mini-step's tokens, ``z_s`` = this forward's router logits. Ranks hold shares of the
    tokens: their gradients (and losses) are summed."""
    predictors = policy.predictor_parameters()
    pl = predictor_loss(
        fit.kind, fit.h_old, fit.z_old, z_s, predictors, fit.valid, fit.count,
        scoring=policy.replay.scoring(),
    )  # fmt: skip
    fit.opt.zero_grad(set_to_none=True)
    pl.backward()
    pl = pl.detach()
    if fit.world > 1:  # predictors are replicated outside DDP/FSDP2: sum the shares here
        for p in predictors:
            dist.all_reduce(p.grad)
        dist.all_reduce(pl)
    fit.opt.step()
    return float(pl)


# -- the learner -----------------------------------------------------------------------------------
class Learner:
    """The policy, its optimizers and how a batch is trained: the whole job in one process
    (this class), or one rank of a data-parallel job
    (:class:`trainer.run.distributed.ShardedLearner`, whose methods are collectives).

    Data parallel: every rank holds the whole batch; ``shard = (rank, world)`` makes each rank
    compute the gradient of its share of each mini-step's groups. ``model`` is the module
    training forwards go through (the DDP wrapper). The old pass is computed on the whole batch
    on every rank; the predictor loss on each rank's share, its gradient summed over ranks."""

    def __init__(
        self,
        policy: Policy,
        cfg: TrainConfig,
        model: torch.nn.Module | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.policy, self.cfg, self.model, self.shard = policy, cfg, model, shard
        self.opt = make_policy_optimizer(policy, cfg)
        self.pred_opt = make_predictor_optimizer(policy, cfg)
        self.scale = ScaleFit(cfg.predictor_scale)
        self.ridge = (
            RidgeFit(cfg.ridge_strength, cfg.ridge_memory) if cfg.predictor == "ridge" else None
        )
        #: mini-step observers (:meth:`mini_steps`): the ridge fit, and any a study adds
        self.observers: list = [self.ridge] if self.ridge is not None else []
        # what the servers serve: at the start the checkpoint's predictor as it is
        self.served = ServedPredictor([w.detach().clone() for w in policy.predictor_parameters()])

    # -- one batch ---------------------------------------------------------------------------------
    def train(self, batch: Batch | None, rollout_predictors: dict | None = None) -> dict:
        """Metrics of training on ``batch`` (nothing when there is none; ``rollout_predictors``:
        see :meth:`train_batch`); then the predictor the next push serves
        (:meth:`served_predictors`)."""
        if batch is None:
            return {}
        served = self.served  # what the last push served
        m, log = self.train_batch(batch, served, rollout_predictors)
        if self.ridge is not None:
            self.ridge.end_batch(self.shard[1])
        if self.cfg.replay.serves_predictor:
            m["predictor_scale_served"] = served.scale
            m["predictor_scale"] = self.scale.update(*log.offset_fit)
            self.served = ServedPredictor(self.next_raw_predictor(), self.scale.alpha)
        return m

    def train_batch(
        self,
        batch: Batch,
        served: ServedPredictor | None = None,
        rollout_predictors: dict[int, list[torch.Tensor] | None] | None = None,
    ) -> tuple[dict, MiniStepLog]:
        """Old pass + ``cfg.off_policy_steps`` mini-steps (+ predictor steps for pr2); the
        metrics and the mini-steps' log.

        ``served``: the predictor the last push served (default: the policy's own at scale 1);
        the scale fit reads its raw offset. ``rollout_predictors``: the predictor each sample
        was served with, by staleness (:class:`trainer.rollouts.async_rollouts.PredictorHistory`;
        default: ``served`` for every sample); the diagnostics compare the served routes with
        it. The observers' ``begin(batch, old)`` is called after the old pass."""
        policy, cfg = self.policy, self.cfg
        batch = batch.to(policy.device)
        t0 = time.perf_counter()
        order = mini_step_groups(batch, cfg.off_policy_steps)
        old = old_pass(policy, batch, cfg.replay, order, world=self.shard[1])
        m = train_infer_metrics(batch, old.logprobs)
        m["time_old_pass"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        routers_before = [w.detach().clone() for w in policy.router_weights()]
        if served is None:
            served = ServedPredictor([w.detach().clone() for w in policy.predictor_parameters()])
        predictor_at_rollout = rollout_predictors or {
            s: served.weights() for s in batch.staleness.long().tolist()
        }
        for obs in self.observers:
            obs.begin(batch, old)
        log = self.mini_steps(batch, old, served.raw if cfg.replay.serves_predictor else None)
        m["first_ratio_max_dev"] = log.first_ratio_max_dev
        m["time_train"] = time.perf_counter() - t0
        m.update(batch_metrics(policy, batch, old, log, routers_before, predictor_at_rollout))
        return m, log

    # -- 2. mini-steps -----------------------------------------------------------------------------
    def mini_steps(
        self, batch: Batch, old: OldPass, served_raw: list[torch.Tensor] | None
    ) -> MiniStepLog:
        """``cfg.off_policy_steps`` mini-steps, each on its slice of the groups (this rank's
        share of it), its loss scaled so that DDP's gradient average equals the single-process
        gradient of the mini-step's token mean; a predictor step in each from mini-step 2 on
        (pr2). ``served_raw``: the rollout's unscaled predictor, for the served scale's fit
        (:mod:`trainer.algo.predictor_scale`) on the off-policy mini-steps. The observers'
        ``mini_step(step, old, rows, z_s, valid)`` sees each mini-step's router logits after
        its forward (the ridge predictor's fit, the research recorders)."""
        (rank, world), mode, policy = self.shard, self.cfg.replay, self.policy
        k, select = policy.replay.top_k, policy.replay.select
        server_routes = flat_routes(batch.routes)
        replayed = replayed_routes(mode, server_routes, old.routes)
        reference = old.routes if mode.records_old_routes else server_routes  # for the deviation
        valid_flat = batch.valid.reshape(-1).bool()
        log = MiniStepLog()
        log.hist = torch.zeros(k + 1, dtype=torch.long, device=policy.device)
        log.hist_off = torch.zeros(k + 1, dtype=torch.long, device=policy.device)
        for step, gidx in enumerate(mini_step_groups(batch, self.cfg.off_policy_steps), start=1):
            all_idx, all_rows = group_rows(batch, gidx, policy.device)
            normalizer = batch.loss_mask[all_idx].sum().clamp(min=1) / world  # the mini-step's
            idx, rows = group_rows(batch, gidx[rank::world], policy.device)
            mb = batch.select(idx)
            forced = None if replayed is None else replayed[rows]
            fit = None
            if mode.serves_predictor and self.pred_opt is not None and step > 1:
                h, z = [x[rows] for x in old.hidden], [x[rows] for x in old.logits]
                count = valid_flat[all_rows].sum()
                kind = self.cfg.predictor_loss
                fit = PredictorFit(kind, h, z, valid_flat[rows], count, self.pred_opt, world)
            lp, st, gn, ctl, pred_loss = self.mini_step(
                mb, old.logprobs[idx], forced, normalizer, fit
            )
            for obs in self.observers:
                obs.mini_step(step, old, rows, ctl.logits, valid_flat[rows])
            if step > 1:  # each off-policy token's own router logits z_s: the predictors' target
                log.keep_step_logits(rows, ctl.logits, valid_flat.numel())
            if step == 1:  # at theta_old with the same routes the ratio must be exactly 1
                dev = ((lp - old.logprobs[idx]).abs() * mb.loss_mask).max()
                log.first_ratio_max_dev = float(dev)
            log.stats.append(st)
            log.grad_norms.append(gn)
            with torch.no_grad():  # logged in every mode (the coefficient may be 0)
                log.load_balance.append(float(load_balance_loss(ctl.logits, ctl.ids, mb.valid)))
            hist = route_deviation(reference[rows], ctl.logits, valid_flat[rows], k, select)
            log.hist += hist
            log.zero_per_step.append(float(hist[0] / hist.sum().clamp(min=1)))
            if step > 1:
                log.hist_off += hist
                if served_raw is not None:  # the served offset's raw b vs the router's move n_s
                    _add_fit_sums(log, old, rows, ctl.logits, served_raw, valid_flat[rows])
            if pred_loss is not None:
                log.predictor_losses.append(pred_loss)
        if world > 1:  # each rank's share of the fit's sums
            sums = torch.tensor(log.offset_fit, dtype=torch.float64)
            dist.all_reduce(sums)
            log.offset_fit = sums.tolist()
        return log

    def mini_step(
        self,
        mb: Batch,
        old_lp: torch.Tensor,
        forced: torch.Tensor | None,
        normalizer: torch.Tensor,
        fit: PredictorFit | None = None,
    ) -> tuple[torch.Tensor, PPOStats, float, RoutingControl, float | None]:
        """One update of the clipped objective on ``mb``; returns its log-probs, PPO stats,
        the policy's grad norm, the routing record of its forward and the predictor loss
        (``fit``)."""
        cfg, policy = self.cfg, self.policy
        ctl = RoutingControl(forced_ids=forced, record=True)
        lp = forward_logprobs(policy, mb, ctl, self.model)
        behav_lp = behaviour_logprobs(mb.server_logprobs, old_lp, mb.staleness)  # fresh: old_lp
        loss, st = decoupled_ppo_loss(
            lp,
            old_lp,
            behav_lp,
            mb.advantages.to(lp.device),
            mb.loss_mask,
            cfg.clip_eps,
            normalizer,
            cfg.behaviour_weight_cap or None,
        )
        if cfg.load_balance_coef:  # Switch aux loss on the route this forward used
            loss = loss + cfg.load_balance_coef * load_balance_loss(ctl.logits, ctl.ids, mb.valid)
        # pr2, off-policy: the predictor towards this forward's router logits z_s (s - 1
        # updates), before this mini-step's update (the reference code's order)
        pred_loss = None if fit is None else predictor_step(policy, fit, ctl.logits)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in policy.policy_parameters() if p.grad is not None]
        # (max_norm inf: only measures; DTensor grads under FSDP2 give a DTensor norm)
        gn = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        self.opt.step()
        return lp.detach(), st, float(full_tensor(gn)), ctl, pred_loss

    # -- what the next push serves -----------------------------------------------------------------
    def next_raw_predictor(self) -> list[torch.Tensor]:
        """The unscaled predictor of the next push: ``W_p`` (learned) or the routers' Adam
        look-ahead over the next batch's off-policy mini-steps (a collective under FSDP2), or the
        ridge fit of the last batches' drift."""
        if self.ridge is not None:
            return self.ridge.weights(self.policy.predictor_parameters())
        if self.cfg.predictor == "lookahead":
            routers = [r.weight for r in self.policy.replay.routers]
            ahead = router_lookahead(self.opt, routers, self.cfg.off_policy_steps)
            return [w.to(self.policy.device) for w in ahead]
        return [w.detach().clone() for w in self.policy.predictor_parameters()]

    def served_predictors(self) -> list[torch.Tensor] | None:
        """The predictor tensors a push sends (per MoE layer: scale x raw); None: the
        policy's own (not pr2)."""
        return self.served.weights() if self.cfg.replay.serves_predictor else None

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole state dict to export, or None: the export reads the model itself."""
        return None


def _add_fit_sums(log: MiniStepLog, old: OldPass, rows, logits, served_raw, valid) -> None:
    """Add a mini-step's ``offset_fit_sums`` (served offset vs the router's move) to the log."""
    h, z = [x[rows] for x in old.hidden], [x[rows] for x in old.logits]
    sums = offset_fit_sums(h, z, logits, served_raw, valid)
    log.offset_fit = [a + b for a, b in zip(log.offset_fit, sums, strict=True)]
