"""Record the router drift a predictor would have to forecast, during a real (R3) run.

A mini-step observer (:class:`trainer.algo.train_step.Learner.observers`). For every batch it keeps
a
sample of ``tokens`` real positions and, per MoE layer: the router input ``h_old``, the logits
``z_old`` (the router at the rollout) and the logits ``z_s`` the router gives the same tokens
in every mini-step ``s = 1..S`` (the router after ``s - 1`` updates, upstream layers' changes
included: a no-grad forward of the sampled sequences with the replayed routes after each
update), plus ``z_{S+1}`` (after the batch), the routers' weights before the batch and the Adam
look-ahead's forecast of the mean move over the next batch's off-policy mini-steps 2..S. On
the WHOLE batch (each off-policy token in its own mini-step, as the trainer sees them) it
keeps the ridge sums of ``--predictor ridge`` and trains shadow learned predictors
(``SHADOWS``: the paper's loss at several lr ratios, and variants) exactly as the trainer
would, without serving them: their ``W_p`` after each batch is stored.
:mod:`trainer.experiments.counterfactual` replays this stream offline and scores every
predictor on identical data.

Arrays (``numpy.savez``): ``h [N, L, n, H]``, ``z [N, S + 1, L, n, E]`` (index 0 = ``z_old``
= mini-step 1), ``routers [N, L, E, H]``, ``lookahead [N, L, E, H]`` and the run's facts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.algo.batch import flat_routes
from trainer.algo.lookahead import router_lookahead
from trainer.algo.replay import RoutingControl
from trainer.algo.ridge import RidgeFit
from trainer.experiments.counterfactual import Learned
from trainer.run.policy import forward_logprobs

__all__ = ["SHADOWS", "DriftRecorder"]

#: Shadow learned predictors: name -> (lr ratio c, loss).
SHADOWS = {
    **{f"kl c={c:g}": (c, "kl") for c in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)},
    **{f"l2 c={c:g}": (c, "l2") for c in (0.1, 0.3)},
    **{f"kl-margin c={c:g}": (c, "kl-margin") for c in (0.1, 0.3)},
}


class DriftRecorder:
    """Attach with ``learner.observers.append(DriftRecorder(learner, path))``; :meth:`save`
    writes the stream (also called after every batch, so a cut run keeps what it had)."""

    def __init__(self, learner, path: Path, tokens: int = 128, sequences: int = 32) -> None:
        self.learner, self.path = learner, Path(path)
        self.tokens, self.sequences = tokens, sequences
        self.h, self.z, self.routers, self.lookahead = [], [], [], []
        self.ridge_a, self.ridge_b, self.ridge_n = [], [], []
        self.shadows = {name: Learned(c, kind) for name, (c, kind) in SHADOWS.items()}
        self.shadow_w: dict[str, list] = {name: [] for name in SHADOWS}
        # the batch being recorded (set by :meth:`begin`): sample, h_old, z_s, routers, ridge
        self._sample = None
        self._h: list = []
        self._z: list = []
        self._routers: list = []
        self._ridge: RidgeFit | None = None

    # -- observer protocol (trainer.algo.train_step.Learner.mini_steps) --
    def begin(self, batch, old) -> None:
        g = torch.Generator().manual_seed(len(self.h))
        n_seq = batch.input_ids.shape[0]
        seqs = torch.randperm(n_seq, generator=g)[: self.sequences].sort().values
        t = batch.input_ids.shape[1]
        rows = (seqs[:, None] * t + torch.arange(t)).reshape(-1)
        valid = batch.valid.reshape(-1)[rows].bool()
        pick = torch.nonzero(valid).reshape(-1)
        pick = pick[torch.randperm(len(pick), generator=g)[: self.tokens].sort().values]
        self._sample = (batch.select(seqs), flat_routes(batch.routes)[rows], pick)
        self._h = [x[rows][pick].float().clone() for x in old.hidden]
        self._z = [[x[rows][pick].float().clone() for x in old.logits]]  # z_1 = z_old
        self._routers = [w.detach().float().clone() for w in self.learner.policy.router_weights()]
        self._ridge = RidgeFit(1.0, 0.0)  # this batch's sums only
        self._ridge.begin(batch, old)
        if all(sh.w is None for sh in self.shadows.values()):
            like = torch.stack(self._routers).double()
            cfg = self.learner.cfg
            for sh in self.shadows.values():
                sh.start(like, cfg.lr * cfg.router_lr_multiplier)

    def mini_step(self, step: int, old, rows, z_s, valid) -> None:
        """After mini-step ``step``'s update: the router now gives ``z_{step + 1}``; the
        mini-step's own tokens (``rows``, logits ``z_s``) feed the ridge sums and shadows."""
        if step > 1:
            self._ridge.mini_step(step, old, rows, z_s, valid)
            m = valid.bool()
            h = torch.stack([x[rows][m] for x in old.hidden]).double()
            z0 = torch.stack([x[rows][m] for x in old.logits]).double()
            zs = torch.stack([x.detach()[m] for x in z_s]).double()
            k = self.learner.policy.replay.top_k
            for sh in self.shadows.values():
                sh.step(h, z0, zs, k)
        self._z.append(self._sample_logits())
        if step == self.learner.cfg.off_policy_steps:
            self._end_batch()

    # -- helpers --
    @torch.no_grad()
    def _sample_logits(self) -> list[torch.Tensor]:
        mb, routes, pick = self._sample
        ctl = RoutingControl(forced_ids=routes, record=True)
        forward_logprobs(self.learner.policy, mb, ctl)
        return [z.float()[pick].clone() for z in ctl.logits]

    def _end_batch(self) -> None:
        learner = self.learner
        routers = [r.weight for r in learner.policy.replay.routers]
        steps = learner.cfg.off_policy_steps  # stored: the mean move over mini-steps 2..S
        ahead = [a * steps / (steps - 1) for a in router_lookahead(learner.opt, routers, steps)]
        self.h.append(torch.stack(self._h).numpy())
        self.z.append(torch.stack([torch.stack(zs) for zs in self._z]).numpy())
        self.routers.append(torch.stack(self._routers).numpy())
        self.lookahead.append(torch.stack([a.float() for a in ahead]).numpy())
        fit = self._ridge
        fit.end_batch()
        self.ridge_a.append(torch.stack(fit.a).numpy())
        self.ridge_b.append(torch.stack(fit.b).numpy())
        self.ridge_n.append(fit.count)
        for name, sh in self.shadows.items():
            self.shadow_w[name].append(sh.w.detach().float().numpy().copy())
        self.save()

    def save(self) -> None:
        cfg = self.learner.cfg
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            h=np.stack(self.h),
            z=np.stack(self.z),
            routers=np.stack(self.routers),
            lookahead=np.stack(self.lookahead),
            ridge_a=np.stack(self.ridge_a),
            ridge_b=np.stack(self.ridge_b),
            ridge_n=np.array(self.ridge_n),
            **{f"shadow:{k}": np.stack(v) for k, v in self.shadow_w.items()},
            top_k=self.learner.policy.replay.top_k,
            router_lr=cfg.lr * cfg.router_lr_multiplier,
            off_policy_steps=cfg.off_policy_steps,
            seed=cfg.seed,
        )
        tmp.replace(self.path)
