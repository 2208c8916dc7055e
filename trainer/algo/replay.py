"""Routing control for the trainer's HF transformers MoE model: replay, record, natural.

Every MoE router (``model.model.layers[i].mlp.gate`` in transformers 5.x; ``mlp.router`` in
GPT-OSS) gets its ``forward`` replaced by one that, per the active :class:`RoutingControl`:

- **force** given expert ids (routing replay: R2, R3, PR2) -- gating is recomputed from the
  *current* router's logits gathered at those ids with the family's normalisation, so gradients
  still reach the router (:func:`pr2_serve.core.routing.gate_weights`, the same function the
  server's
  routers use);
- **natural** top-k, optionally on ``z + W_p h`` (the predictor-adjusted selection the server
  makes) -- still gated by the unadjusted ``z``;
- **record** the router input ``h``, logits ``z`` and chosen ids per layer.

Each family keeps its own router (:func:`router_kind`): softmax top-k (Qwen, Mixtral, OLMoE);
GPT-OSS, whose logits hold the router's bias (trained like the weight); the grouped sigmoid
routers of DeepSeek-V3 / GLM-4.5, which select by group-limited top-k on
``sigmoid(z + W_p h) + c`` and gate with ``sigmoid(z)``
(:func:`pr2_serve.core.routing.grouped_route`)
-- their correction bias ``c`` is a buffer, as in those models: load-balancing state adjusted
outside the gradient, never a trained parameter; and DeepSeek-V2's group-limited softmax
router, which selects on ``softmax(z + W_p h)`` (groups ranked by their best score) and gates
with ``softmax(z)`` at the ids, not renormalised, times ``routed_scaling_factor``.

Predictors are ``nn.Linear(hidden, num_experts, bias=False)`` modules added as
``layers[i].mlp.predictor`` (state-dict name ``model.layers.{i}.mlp.predictor.weight``, the name
the server loads), zero-initialised.

Token order: forced ids are ``[T, num_moe_layers, k]`` with ``T = batch * seq`` in the order HF
flattens hidden states (row-major over ``[batch, seq]``).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pr2_serve.core.routing import gate_weights, grouped_gate, grouped_select, select_experts

__all__ = ["MoEReplay", "RoutingControl", "router_kind"]

ROUTER_NAMES = ("gate", "router")  # the router's attribute in the family's MoE block


def router_kind(router: nn.Module) -> str:
    """``"grouped"`` (sigmoid, correction bias, group-limited top-k), ``"grouped_softmax"``
    (DeepSeek-V2: softmax, group-limited top-k), ``"biased"`` (a Linear with a bias: GPT-OSS)
    or ``"softmax"`` (plain top-k)."""
    if getattr(router, "e_score_correction_bias", None) is not None:
        return "grouped"
    if getattr(router, "topk_method", None) in ("group_limited_greedy", "greedy"):
        return "grouped_softmax"
    if getattr(router, "bias", None) is not None:
        return "biased"
    return "softmax"


@dataclass
class RoutingControl:
    """What the routers do during one forward (see module docstring)."""

    forced_ids: torch.Tensor | None = None  # [T, L, k]; None: natural selection
    use_predictor: bool = False  # natural selection on z + W_p h
    record: bool = False
    hidden: list[torch.Tensor] = field(default_factory=list)  # per MoE layer [T, H]
    logits: list[torch.Tensor] = field(default_factory=list)  # per MoE layer [T, E]
    ids: list[torch.Tensor] = field(default_factory=list)  # per MoE layer [T, k]

    def recorded_routes(self) -> torch.Tensor:
        """Chosen ids of the last forward, ``[T, L, k]``."""
        return torch.stack(self.ids, dim=1)


class MoEReplay:
    """Attach routing control and predictors to a transformers MoE causal LM (in place).

    Example:
        >>> replay = MoEReplay(model)                                   # doctest: +SKIP
        >>> with replay.control(RoutingControl(forced_ids=routes)):    # doctest: +SKIP
        ...     logits = model(input_ids).logits
    """

    def __init__(self, model: nn.Module, experts_implementation: str = "eager") -> None:
        from pr2_serve.plugin.compat import check_transformers_version

        check_transformers_version()
        self.model = model
        config = model.config
        self.num_experts = int(getattr(config, "num_experts", None) or config.num_local_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.layer_indices: list[int] = []
        self.routers: list[nn.Module] = []
        self.predictors: list[nn.Linear] = []
        self._control: RoutingControl | None = None
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        for i, layer in enumerate(model.model.layers):
            block = getattr(layer, "mlp", None)
            router = _router_of(block)
            if router is None:
                continue  # dense layer
            if not hasattr(block, "predictor"):
                block.predictor = nn.Linear(
                    config.hidden_size, self.num_experts, bias=False, dtype=dtype, device=device
                )
                nn.init.zeros_(block.predictor.weight)
            ordinal = len(self.routers)
            router.forward = types.MethodType(_make_forward(self, ordinal, block.predictor), router)
            self.layer_indices.append(i)
            self.routers.append(router)
            self.predictors.append(block.predictor)
        if not self.routers:
            raise ValueError("no MoE router found (is this a supported MoE family?)")
        # transformers' grouped kernels are a hair off eager (~1e-7 in fp32 logits): eager is
        # the reference (route tests, experiments); the trainer takes grouped_mm, whose backward
        # is much faster (benchmarks/experts.py; TrainConfig.experts_implementation)
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(experts_implementation)

    @property
    def num_moe_layers(self) -> int:
        return len(self.routers)

    def renormalize(self, router: nn.Module) -> bool:
        # Mixtral's router has no flag and always renormalises.
        return bool(getattr(router, "norm_topk_prob", True))

    @contextlib.contextmanager
    def control(self, ctl: RoutingControl) -> Iterator[RoutingControl]:
        prev, self._control = self._control, ctl
        try:
            yield ctl
        finally:
            self._control = prev

    def select(
        self, layer: int, z: torch.Tensor, h: torch.Tensor | None, w_p: torch.Tensor | None
    ) -> torch.Tensor:
        """MoE layer ``layer``'s natural selection on its logits ``z`` as the family selects
        (``w_p``: PR2's, on ``z + W_p h``), ``[T, k]`` int64 -- what fresh routes, deviations and
        predictor hits are measured against (plain ``topk(z)`` is not the grouped routers')."""
        router = self.routers[layer]
        kind = router_kind(router)
        if kind == "grouped":
            return grouped_select(
                z,
                h,
                w_p,
                self.top_k,
                router.num_group,
                router.topk_group,
                "sigmoid",
                router.e_score_correction_bias,
            )
        if kind == "grouped_softmax":
            groups, kept = _softmax_groups(router)
            return grouped_select(z, h, w_p, self.top_k, groups, kept, "softmax")
        return select_experts(z, h, w_p, self.top_k)

    def gate(self, layer: int, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """MoE layer ``layer``'s gating of the plain logits ``z`` at ``ids``, in the dtype the
        family's router returns (its logits' dtype; fp32 for the grouped routers)."""
        router = self.routers[layer]
        kind = router_kind(router)
        if kind == "grouped":
            return grouped_gate(z, ids, router.norm_topk_prob, router.routed_scaling_factor)
        if kind == "grouped_softmax":  # the chosen softmax scores, never renormalised
            return grouped_gate(z, ids, False, router.routed_scaling_factor, "softmax")
        return gate_weights(z.float(), ids, self.renormalize(router)).to(z.dtype)

    def scoring(self) -> list[str]:
        """Per MoE layer, the scores the router ranks: ``"sigmoid"`` (DeepSeek-V3, GLM-4.5) or
        ``"softmax"`` (the others) -- what the learned predictor's loss compares."""
        return ["sigmoid" if router_kind(r) == "grouped" else "softmax" for r in self.routers]

    def predictor_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"model.layers.{i}.mlp.predictor.weight": W_p}`` for every MoE layer."""
        return {
            f"model.layers.{i}.mlp.predictor.weight": p.weight
            for i, p in zip(self.layer_indices, self.predictors, strict=True)
        }

    def load_predictors(self, tensors: dict[str, torch.Tensor]) -> int:
        """Copy predictor weights present in ``tensors``; return how many were loaded."""
        n = 0
        with torch.no_grad():
            for name, param in self.predictor_state_dict().items():
                if name in tensors:
                    param.copy_(tensors[name])
                    n += 1
        return n


def _router_of(block: nn.Module | None) -> nn.Module | None:
    for name in ROUTER_NAMES:
        router = getattr(block, name, None)
        if router is not None and hasattr(router, "top_k"):
            return router
    return None


def _softmax_groups(router: nn.Module) -> tuple[int, int]:
    """DeepSeek-V2's ``(groups, groups kept)``: its ``greedy`` router is one group."""
    if router.topk_method == "greedy":
        return 1, 1
    return int(router.num_group), int(router.topk_group)


def _logits(router: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``z`` as the family computes it: fp32 for the grouped routers, with the bias for
    GPT-OSS, in the model's dtype otherwise."""
    if router_kind(router).startswith("grouped"):
        return F.linear(h.float(), router.weight.float())
    return F.linear(h, router.weight, getattr(router, "bias", None))


def _make_forward(replay: MoEReplay, ordinal: int, predictor: nn.Linear):
    def forward(self, hidden_states: torch.Tensor):
        h = hidden_states.reshape(-1, self.hidden_dim)
        z = _logits(self, h)
        ctl = replay._control or RoutingControl()
        if ctl.forced_ids is not None:
            ids = ctl.forced_ids[:, ordinal].to(device=z.device, dtype=torch.long)
            if ids.shape[0] != z.shape[0]:
                raise ValueError(f"forced ids have {ids.shape[0]} tokens, the batch {z.shape[0]}")
        else:
            ids = replay.select(ordinal, z, h, predictor.weight if ctl.use_predictor else None)
        weights = replay.gate(ordinal, z, ids)
        if ctl.record:
            ctl.hidden.append(h)
            ctl.logits.append(z)
            ctl.ids.append(ids)
        return z, weights, ids

    return forward
