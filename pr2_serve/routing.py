"""PR2 routing math, shared by the vLLM plugin (serving) and the trainer (replay).

Pure torch, no vLLM import: it runs on any device and under ``torch.compile`` / CUDA graphs
(no ``.item()``, no host sync, no Python-side lists of tensors).

Notation (see ``shared/notes/pr2-method.md``): per MoE layer and token, ``h`` is the router input,
``z = W_r h`` the router logits over ``E`` experts, ``b = W_p h`` the evolution predictor's offset.

- selection: ``ids = topk(z + b, k)``
- gating:    ``w = gate(z)[ids]`` -- the family's normal gating of the *unadjusted* logits,
  i.e. softmax over all experts gathered at ``ids``, renormalised over the ``k`` chosen ones when
  the family does so (Qwen3-MoE ``norm_topk_prob=True``, Mixtral), not otherwise (Qwen2-MoE, OLMoE).

Both halves mirror vLLM's own CPU router (``_softmax_topk``) operation for operation, so with a
zero predictor the plugin's routing is bit-identical to stock vLLM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "deviation_counts",
    "deviation_histogram",
    "gate_weights",
    "pr2_route",
    "predictor_offsets",
    "select_experts",
]


def predictor_offsets(hidden: torch.Tensor, predictor_weight: torch.Tensor) -> torch.Tensor:
    """Per-expert logit offsets ``b = W_p h``.

    Args:
        hidden: ``[T, H]`` router inputs.
        predictor_weight: ``[E, H]`` (``Linear(H, E, bias=False).weight``).

    Returns:
        ``[T, E]`` in the dtype of ``hidden``.
    """
    return F.linear(hidden, predictor_weight.to(hidden.dtype))


def select_experts(
    router_logits: torch.Tensor, offsets: torch.Tensor | None, top_k: int
) -> torch.Tensor:
    """Expert ids ``topk(z + b, k)`` per token, ``[T, k]`` int64.

    ``offsets=None`` is plain top-k on the router logits. The sum is taken in the logits' dtype
    (fp32 for vLLM's gate), so a zero offset leaves the selection bit-identical.
    """
    scores = router_logits if offsets is None else router_logits + offsets.to(router_logits.dtype)
    return torch.topk(scores, k=top_k, dim=-1, sorted=False).indices


def gate_weights(router_logits: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The family's gating of the unadjusted logits, gathered at ``ids``: ``[T, k]`` fp32.

    ``renormalize=True``: softmax over the ``k`` chosen logits (= softmax over all experts,
    gathered, divided by its sum). ``False``: the plain softmax probability of each chosen expert.
    """
    chosen = router_logits.gather(-1, ids)
    if renormalize:
        weights = torch.softmax(chosen, dim=-1)
    else:
        log_z = torch.logsumexp(router_logits, dim=-1, keepdim=True)
        weights = (chosen - log_z).exp()
    return weights.to(torch.float32)


def pr2_route(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    predictor_weight: torch.Tensor | None,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PR2 routing for one MoE layer: ``(weights [T, k] fp32, ids [T, k] int32)``.

    Example:
        >>> h = torch.randn(5, 64); w_r = torch.randn(8, 64); w_p = torch.zeros(8, 64)
        >>> w, ids = pr2_route(h, h @ w_r.T, w_p, top_k=2, renormalize=True)
        >>> w.shape, ids.shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
    """
    if predictor_weight is None:
        scores = router_logits
    else:  # z + h W_p^T as one fused op (addmm); with W_p == 0 this is exactly z
        z = router_logits
        scores = torch.addmm(z, hidden.to(z.dtype), predictor_weight.to(z.dtype).t())
    ids = torch.topk(scores, k=top_k, dim=-1, sorted=False).indices
    return gate_weights(router_logits, ids, renormalize), ids.to(torch.int32)


def deviation_counts(replayed_ids: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    """How many of the ``k`` replayed experts are not in the router's fresh top-k, per row.

    Args:
        replayed_ids: ``[..., k]`` expert ids that were (or will be) forced.
        router_logits: ``[..., E]`` the current router's logits for the same tokens.

    Returns:
        ``[...]`` int64 in ``0..k``; 0 means the replayed route equals the fresh route (as sets).
    """
    k = replayed_ids.shape[-1]
    fresh = torch.topk(router_logits, k=k, dim=-1).indices
    hit = (replayed_ids.long().unsqueeze(-1) == fresh.unsqueeze(-2)).any(-1)
    return k - hit.sum(-1)


def deviation_histogram(counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Histogram of :func:`deviation_counts` over ``0..top_k``: ``[top_k + 1]`` int64."""
    return torch.bincount(counts.reshape(-1).long(), minlength=top_k + 1)
