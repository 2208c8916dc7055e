"""Switch Transformer's load-balancing loss on the routers (Fedus et al. 2021, eq. 4). Pure torch.

Per MoE layer, over the real tokens of one forward: ``f_e`` = share of the (token, slot) route
entries that went to expert ``e`` by the route the forward actually used (replayed ids or its
own top-k; ``sum_e f_e = 1``), ``P_e`` = mean router probability of ``e`` (softmax of the
router logits). The loss is ``E * sum_e f_e * P_e``, summed over MoE layers: 1 per layer when
routing is uniform, up to ``E`` when every token goes to one expert. Only ``P`` carries a
gradient (``f`` counts discrete choices), so it reaches the routers and pushes probability away
from overloaded experts.

The trainer adds ``load_balance_coef x`` this to each mini-step's loss (``--load-balance-coef``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["load_balance_loss"]


def load_balance_loss(
    logits: Sequence[torch.Tensor],
    ids: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers of ``E * sum_e f_e * P_e``.

    Args:
        logits: router logits per MoE layer, ``[T, E]`` (with their graph).
        ids: the experts each token was routed to per layer, ``[T, k]``.
        mask: ``[T]``, 1 on real tokens (default: all).

    >>> z = torch.zeros(4, 2)  # uniform router, tokens split evenly: 1 per layer
    >>> float(load_balance_loss([z], [torch.tensor([[0], [1], [0], [1]])]))
    1.0
    """
    total = torch.zeros((), dtype=torch.float32, device=logits[0].device)
    for z, idx in zip(logits, ids, strict=True):
        num_experts = z.shape[-1]
        m = torch.ones(z.shape[0], device=z.device) if mask is None else mask.float().reshape(-1)
        n = m.sum().clamp(min=1)
        probs = F.softmax(z.float(), dim=-1)
        p_mean = (probs * m[:, None]).sum(0) / n
        counts = F.one_hot(idx.long(), num_experts).sum(1).float()  # [T, E]
        frac = (counts * m[:, None]).sum(0) / (n * idx.shape[-1])
        total = total + num_experts * (frac.detach() * p_mean).sum()
    return total
