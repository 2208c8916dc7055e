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

__all__ = [
    "compiled_pr2_route",
    "deviation_counts",
    "deviation_histogram",
    "gate_weights",
    "pr2_route",
    "select_experts",
    "selection_scores",
]


def selection_scores(
    router_logits: torch.Tensor, hidden: torch.Tensor, predictor_weight: torch.Tensor | None
) -> torch.Tensor:
    """The PR2 selection scores ``z + W_p h`` -- the one definition, for serving and training.

    Args:
        router_logits: ``[T, E]`` ``z = W_r h``.
        hidden: ``[T, H]`` router inputs ``h``.
        predictor_weight: ``[E, H]`` (``Linear(H, E, bias=False).weight``); None: plain ``z``.

    Returns:
        ``[T, E]`` in the logits' dtype, as one fused op (addmm); with ``W_p == 0`` this is
        exactly ``z`` (so a zero predictor leaves the selection bit-identical to stock).
    """
    if predictor_weight is None:
        return router_logits
    z = router_logits
    return torch.addmm(z, hidden.to(z.dtype), predictor_weight.to(z.dtype).t())


def select_experts(
    router_logits: torch.Tensor,
    hidden: torch.Tensor | None,
    predictor_weight: torch.Tensor | None,
    top_k: int,
) -> torch.Tensor:
    """Expert ids ``topk(z + W_p h, k)`` per token, ``[T, k]`` int64 (unsorted)."""
    scores = selection_scores(router_logits, hidden, predictor_weight)
    return torch.topk(scores, k=top_k, dim=-1, sorted=False).indices


def gate_weights(router_logits: torch.Tensor, ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The family's gating of the unadjusted logits, gathered at ``ids``: ``[T, k]`` fp32.

    Computed in fp32 whatever the logits' dtype, as vLLM's fused CUDA gating does (bf16
    softmax/logsumexp would be off by up to ~4e-2 relative at Qwen3-30B-A3B's shape).
    ``renormalize=True``: softmax over the ``k`` chosen logits (= softmax over all experts,
    gathered, divided by its sum). ``False``: the plain softmax probability of each chosen expert.
    """
    z = router_logits.float()
    chosen = z.gather(-1, ids)
    if renormalize:
        return torch.softmax(chosen, dim=-1)
    return (chosen - torch.logsumexp(z, dim=-1, keepdim=True)).exp()


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
    ids = select_experts(router_logits, hidden, predictor_weight, top_k)
    return gate_weights(router_logits, ids, renormalize), ids.to(torch.int32)


def compiled_pr2_route():
    """:func:`pr2_route` compiled by ``torch.compile`` (dynamic token count, no graph breaks).

    Inside vLLM the MoE layer is an opaque custom op, so vLLM's own compilation never sees the
    router: eager, the PR2 routing is ~8 small kernels per layer. Compiled, they fuse. Set
    ``PR2_COMPILE_ROUTING=0`` to run eager (the fallback)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(pr2_route, dynamic=True, fullgraph=True)
    return _COMPILED


_COMPILED = None


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
