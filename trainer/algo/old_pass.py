"""How a rollout batch is split into mini-steps, and the old pass over it (phase 1 of
:mod:`trainer.algo.train_step`): log-probs at theta_old, the router inputs and logits per MoE
layer, and (R2) the routes the trainer's own router chose."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.algo.batch import Batch, flat_routes
from trainer.algo.replay import RoutingControl
from trainer.algo.replay_mode import ReplayMode
from trainer.run.policy import Policy, forward_logprobs


# -- how a batch is split --------------------------------------------------------------------------
def mini_step_groups(batch: Batch, off_policy_steps: int) -> tuple[torch.Tensor, ...]:
    """The GRPO groups of each mini-step (group indices, in order)."""
    groups = batch.input_ids.shape[0] // batch.group_size
    return torch.arange(groups).chunk(off_policy_steps)


def group_rows(batch: Batch, gidx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of groups ``gidx`` and their rows in the flat ``[B * T]`` token order."""
    t = batch.input_ids.shape[1]
    gidx = gidx.to(device)
    arange_g = torch.arange(batch.group_size, device=device)
    idx = (gidx[:, None] * batch.group_size + arange_g).reshape(-1)
    return idx, (idx[:, None] * t + torch.arange(t, device=device)).reshape(-1)


def replayed_routes(
    mode: ReplayMode, server_routes: torch.Tensor, old_routes: torch.Tensor | None
) -> torch.Tensor | None:
    """The routes a forward forces, per mode: the server's (r3, pr2), the old pass's own (r2:
    None in the old pass itself, which records them), none (``none``: natural routing)."""
    if mode.replays_server_routes:
        return server_routes
    return old_routes if mode.records_old_routes else None


# -- 1. old pass -----------------------------------------------------------------------------------
@dataclass
class OldPass:
    logprobs: torch.Tensor  # [B, T] at theta_old
    hidden: list[torch.Tensor]  # h_old per MoE layer, [B * T, H]
    logits: list[torch.Tensor]  # z_old per MoE layer, [B * T, E]
    routes: torch.Tensor | None  # r2: the routes the old pass chose, [B * T, L, k]


@torch.no_grad()
def old_pass(
    policy: Policy,
    batch: Batch,
    mode: ReplayMode | str,
    order: tuple[torch.Tensor, ...],
    world: int,
) -> OldPass:
    """Log-probs at theta_old, router inputs/logits (and r2's routes) of the whole batch.

    Run in the same pieces (mini-step x rank shard) as the training forwards: equal shapes give
    bit-identical kernels, so mini-step 1's ratio is exactly 1 when replaying."""
    mode = ReplayMode(mode)
    server_routes = flat_routes(batch.routes)
    b, t = batch.input_ids.shape
    old_lp = torch.zeros(b, t, device=policy.device)
    h_old = z_old = None
    old_routes = torch.zeros_like(server_routes) if mode.records_old_routes else None
    replayed = replayed_routes(mode, server_routes, None)
    for gidx in order:
        for r in range(world):
            idx, rows = group_rows(batch, gidx[r::world], policy.device)
            if len(idx) == 0:
                continue
            forced = None if replayed is None else replayed[rows]
            ctl = RoutingControl(forced_ids=forced, record=True)
            old_lp[idx] = forward_logprobs(policy, batch.select(idx), ctl)
            if h_old is None:
                h_old = [h.new_zeros(b * t, h.shape[-1]) for h in ctl.hidden]
                z_old = [z.new_zeros(b * t, z.shape[-1]) for z in ctl.logits]
            for layer in range(len(ctl.hidden)):
                h_old[layer][rows] = ctl.hidden[layer]
                z_old[layer][rows] = ctl.logits[layer]
            if old_routes is not None:
                old_routes[rows] = ctl.recorded_routes()
    return OldPass(old_lp, h_old, z_old, old_routes)
