"""Adam look-ahead predictor (``--predictor lookahead``; beyond the paper, nothing trained).

The router is linear, ``z = W_r h``, and Adam moves it by ``-lr * m_hat / (sqrt(v_hat) + eps)``
per update. With no knowledge of the next batch's gradients (zero mean), the momentum carries
on decaying, ``E[m_{t+j}] = beta1^j m_t``, while the second moment stays ``v_t``; the next
batch's mini-step ``s`` runs after ``s - 1`` updates, so its router is ``W_r + D_s`` with

    D_s = - lr * sum_{j=1}^{s-1} m_hat_j / (sqrt(v_hat_j) + eps),
    m_hat_j = beta1^j m_t / (1 - beta1^(t+j)),   v_hat_j = v_t / (1 - beta2^(t+j))

(Adam's own bias corrections at update ``t + j``; ``t`` = the router's update count). The
predictor ``W_p = mean_{s=1..S} D_s`` (``D_1 = 0``) makes ``z_old + W_p h_old = (W_r + W_p)
h_old`` the expected mean router over ALL the mini-steps that replay the served routes:
mini-step 1 runs before any update, and there any offset can only cost, so it is in the mean
(that is ``(S - 1) / S`` of the mean over the off-policy mini-steps alone; the paired
counterfactual, ``docs/counterfactual.md``, measured both). Pure torch.
"""

from __future__ import annotations

import torch

__all__ = ["adam_lookahead", "router_lookahead"]


def adam_lookahead(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    window: int,
) -> torch.Tensor:
    """``mean_{s=1..window} D_s`` (see module docstring) for one parameter's Adam state; zero
    for ``window < 2`` or before the first update (``step == 0``)."""
    b1, b2 = betas
    out = torch.zeros_like(exp_avg, dtype=torch.float32)
    if window < 2 or step == 0:
        return out
    m, v = exp_avg.float(), exp_avg_sq.float()
    moves = []  # Delta_j, j = 1 .. window - 1
    for j in range(1, window):
        m_hat = b1**j * m / (1 - b1 ** (step + j))
        v_hat = v / (1 - b2 ** (step + j))
        moves.append(-lr * m_hat / (v_hat.sqrt() + eps))
    for s in range(2, window + 1):  # D_s = Delta_1 + ... + Delta_{s-1}; D_1 = 0
        out += sum(moves[: s - 1])
    return out / window


def router_lookahead(
    opt: torch.optim.Optimizer, routers: list[torch.Tensor], window: int
) -> list[torch.Tensor]:
    """:func:`adam_lookahead` of each router weight from ``opt`` (a torch Adam holding them),
    as whole tensors (a collective when FSDP2 shards the state: every rank calls it)."""
    from trainer.run.policy import full_tensor

    params = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = []
    for w in routers:
        group = params.get(id(w))
        if group is None:
            raise ValueError("router_lookahead: a router weight is not in the optimizer")
        if group.get("weight_decay", 0) or group.get("amsgrad") or group.get("maximize"):
            raise ValueError("router_lookahead: plain Adam only (no weight decay/amsgrad/maximize)")
        state = opt.state.get(w, {})
        if not state:
            out.append(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
            continue
        out.append(
            adam_lookahead(
                full_tensor(state["exp_avg"]),
                full_tensor(state["exp_avg_sq"]),
                int(state["step"]),
                float(group["lr"]),
                tuple(group["betas"]),
                float(group["eps"]),
                window,
            )
        )
    return out
