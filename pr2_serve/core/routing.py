"""PR2 routing math, shared by the vLLM plugin (serving) and the trainer (replay).

Pure torch, no vLLM import: it runs on any device and under ``torch.compile`` / CUDA graphs
(no ``.item()``, no host sync, no Python-side lists of tensors).

Notation (see ``docs/method.md``): per MoE layer and token, ``h`` is the router input,
``z = W_r h`` the router logits over ``E`` experts, ``b = W_p h`` the evolution predictor's offset.

- selection: ``ids = topk(z + b, k)``
- gating:    ``w = gate(z)[ids]`` -- the family's normal gating of the *unadjusted* logits,
  i.e. softmax over all experts gathered at ``ids``, renormalised over the ``k`` chosen ones when
  the family does so (Qwen3-MoE ``norm_topk_prob=True``, Mixtral), not otherwise (Qwen2-MoE, OLMoE).

Both halves mirror vLLM's own CPU router (``_softmax_topk``) operation for operation, so with a
zero predictor the plugin's routing is bit-identical to stock vLLM's.

Other router kinds keep the same split -- the predictor moves the *selection* only, the weights
are the family's own from the plain logits:

- GPT-OSS (a router with a bias): ``z`` already holds the bias (``z = W_r h + b_r``), so
  :func:`pr2_route` with ``renormalize=True`` is its router: top-k of ``z + W_p h``, softmax over
  the selected ``z``.
- DeepSeek-V3 / GLM-4.5 / Kimi-K2 (``noaux_tc``, :func:`grouped_route`): the predictor enters
  inside the sigmoid, ``sigmoid(z + W_p h) + c`` with the correction bias ``c``, because that
  is the score the family ranks (groups by the sum of their two best, then experts inside the
  chosen groups); adding it after the sigmoid would make a logit-space predictor's effect
  depend on how saturated the sigmoid is. The weights stay ``sigmoid(z)`` of the chosen experts.
"""

from __future__ import annotations

import torch

__all__ = [
    "compiled",
    "compiled_pr2_route",
    "deviation_counts",
    "deviation_histogram",
    "gate_weights",
    "grouped_gate",
    "grouped_route",
    "grouped_select",
    "pr2_route",
    "route_misses",
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


def _scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """The family's expert scores from fp32 logits: ``sigmoid`` or ``softmax``."""
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"unsupported scoring function {scoring_func!r}")


def grouped_select(
    router_logits: torch.Tensor,
    hidden: torch.Tensor | None,
    predictor_weight: torch.Tensor | None,
    top_k: int,
    num_groups: int,
    topk_group: int,
    scoring_func: str = "sigmoid",
    correction_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-limited top-k on ``score(z + W_p h) (+ c)``: ``[T, k]`` int64 (unsorted).

    The experts are split into ``num_groups`` contiguous groups; each group is ranked by the sum
    of its two best scores when there is a correction bias (``noaux_tc``: DeepSeek-V3, GLM-4.5),
    by its best score otherwise (DeepSeek-V2's ``group_limited_greedy``); the best ``topk_group``
    groups are kept and the top ``k`` experts inside them chosen. Written op for op as vLLM's CPU
    ``_grouped_topk``, so a zero predictor selects bit-identically.
    """
    z = selection_scores(router_logits.float(), hidden, predictor_weight)
    scores = _scores(z, scoring_func)
    t = scores.shape[0]
    if correction_bias is not None:
        scores = scores + correction_bias.float().unsqueeze(0)
        group_scores = scores.view(t, num_groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = scores.view(t, num_groups, -1).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(t, num_groups, scores.shape[-1] // num_groups)
        .reshape(t, -1)
    )
    masked = scores.masked_fill(~score_mask.bool(), float("-inf"))
    return torch.topk(masked, k=top_k, dim=-1, sorted=False)[1]


def grouped_gate(
    router_logits: torch.Tensor,
    ids: torch.Tensor,
    renormalize: bool,
    routed_scaling_factor: float = 1.0,
    scoring_func: str = "sigmoid",
) -> torch.Tensor:
    """The grouped families' weights: ``score(z)`` of the chosen experts (the plain logits, no
    predictor, no correction bias), over their sum when ``renormalize``, times
    ``routed_scaling_factor`` (vLLM passes 1.0 where it scales the layer's output instead).
    ``[T, k]`` fp32. HF adds 1e-20 to the sum, below fp32 resolution for any sum of scores."""
    w = _scores(router_logits.float(), scoring_func).gather(1, ids.long())
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        w = w * routed_scaling_factor
    return w


def grouped_route(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    predictor_weight: torch.Tensor | None,
    top_k: int,
    renormalize: bool,
    *,
    num_groups: int,
    topk_group: int,
    scoring_func: str = "sigmoid",
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PR2 routing for one grouped MoE layer: ``(weights [T, k] fp32, ids [T, k] int32)``.

    Example (a DeepSeek-V3-style layer: 16 experts in 4 groups, 2 groups kept, top-4):
        >>> h = torch.randn(5, 64); z = h @ torch.randn(16, 64).T; c = torch.randn(16) * 0.1
        >>> w, ids = grouped_route(h, z, torch.zeros(16, 64), 4, True, num_groups=4,
        ...                        topk_group=2, correction_bias=c, routed_scaling_factor=2.5)
        >>> ids.shape, bool(torch.allclose(w.sum(-1), torch.full((5,), 2.5)))
        (torch.Size([5, 4]), True)
    """
    ids = grouped_select(
        router_logits,
        hidden,
        predictor_weight,
        top_k,
        num_groups,
        topk_group,
        scoring_func,
        correction_bias,
    )
    w = grouped_gate(router_logits, ids, renormalize, routed_scaling_factor, scoring_func)
    return w, ids.to(torch.int32)


def compiled_pr2_route():
    """:func:`pr2_route` compiled by ``torch.compile`` (dynamic token count, no graph breaks).

    Inside vLLM the MoE layer is an opaque custom op, so vLLM's own compilation never sees the
    router: eager, the PR2 routing is ~8 small kernels per layer. Compiled, they fuse. Set
    ``PR2_COMPILE_ROUTING=0`` to run eager (the fallback)."""
    return compiled(pr2_route)


def compiled(route):
    """``route`` (:func:`pr2_route` or :func:`grouped_route`) compiled once per process."""
    if route not in _COMPILED:
        _COMPILED[route] = torch.compile(route, dynamic=True, fullgraph=True)
    return _COMPILED[route]


_COMPILED: dict = {}


def deviation_counts(replayed_ids: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    """How many of the ``k`` replayed experts are not in the router's fresh top-k, per row.

    Args:
        replayed_ids: ``[..., k]`` expert ids that were (or will be) forced.
        router_logits: ``[..., E]`` the current router's logits for the same tokens.

    Returns:
        ``[...]`` int64 in ``0..k``; 0 means the replayed route equals the fresh route (as sets).
        Plain top-k routers only: for the others, pass the family's own fresh selection to
        :func:`route_misses`.
    """
    k = replayed_ids.shape[-1]
    return route_misses(replayed_ids, torch.topk(router_logits, k=k, dim=-1).indices)


def route_misses(replayed_ids: torch.Tensor, fresh_ids: torch.Tensor) -> torch.Tensor:
    """Per row, how many of ``replayed_ids`` are not among ``fresh_ids`` (``[..., k]`` each):
    ``[...]`` int64 in ``0..k``."""
    hit = (replayed_ids.long().unsqueeze(-1) == fresh_ids.long().unsqueeze(-2)).any(-1)
    return replayed_ids.shape[-1] - hit.sum(-1)


def deviation_histogram(counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Histogram of :func:`deviation_counts` over ``0..top_k``: ``[top_k + 1]`` int64."""
    return torch.bincount(counts.reshape(-1).long(), minlength=top_k + 1)
