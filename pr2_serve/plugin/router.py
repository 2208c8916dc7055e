"""The PR2 router of one MoE layer and the step's route capture buffer: pure torch, no vLLM.

vLLM calls :class:`PR2Router` as the layer's ``custom_routing_function``; it selects
``topk(z + W_p h)`` with the family's gating of ``z`` (:func:`pr2_serve.core.routing.pr2_route`,
compiled on CUDA) -- or, for a grouped layer (DeepSeek-V3, GLM-4.5: :class:`GroupedRouting`),
the group-limited top-k of ``sigmoid(z + W_p h) + c`` gated by ``sigmoid(z)``
(:func:`pr2_serve.core.routing.grouped_route`) -- and writes the ids into :class:`RouteCapture` -- a
slice copy into one preallocated buffer, no host sync, so it runs unchanged inside CUDA graphs
(the GPU check captures it at padded batch sizes).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from pr2_serve.core.route_protocol import capture_dtype
from pr2_serve.core.routing import compiled, grouped_route, pr2_route


@dataclass(frozen=True)
class GroupedRouting:
    """What a grouped layer's router needs besides the logits: the layer's own settings, as
    vLLM's grouped router would have received them."""

    num_groups: int
    topk_group: int
    scoring_func: str
    correction_bias: torch.Tensor | None  # the gate's parameter itself (loads update it)
    # 1.0 where vLLM scales the layer's output instead (apply_routed_scale_to_output)
    routed_scaling_factor: float


class PR2Predictor(nn.Module):
    """``Linear(hidden, num_experts, bias=False)`` weight holder, zero at start (PR2 == R3)."""

    def __init__(self, num_experts: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.zeros(num_experts, hidden_size, dtype=dtype), requires_grad=False
        )


class RouteCapture:
    """One step's routed expert ids, ``[rows, num_moe_layers, top_k]`` on the model's device."""

    def __init__(self, max_tokens: int, num_moe_layers: int, top_k: int, num_experts: int):
        dtype = capture_dtype(num_experts)
        self.buffer = torch.zeros(max_tokens, num_moe_layers, top_k, dtype=dtype)
        self.num_experts = num_experts

    def record(self, moe_layer: int, ids: torch.Tensor) -> None:
        n = ids.shape[0]
        if n > self.buffer.shape[0]:
            raise RuntimeError(
                f"route capture got {n} rows for a step but holds {self.buffer.shape[0]} "
                "(data parallel with naive dispatch is not supported with routes)"
            )
        self.buffer[:n, moe_layer].copy_(ids)


class PR2Router:
    """vLLM ``custom_routing_function`` for one MoE layer (bound to its predictor after init)."""

    def __init__(self, layer_index: int, grouped: GroupedRouting | None = None) -> None:
        self.layer_index = layer_index
        self.grouped = grouped
        self.moe_layer = -1
        self.predictor: PR2Predictor | None = None
        self.capture: RouteCapture | None = None
        self._route = None

    def _choose_route(self, hidden_states: torch.Tensor):
        """Compiled routing on CUDA (``PR2_COMPILE_ROUTING=0``: eager), eager elsewhere."""
        compile_ = hidden_states.is_cuda and os.environ.get("PR2_COMPILE_ROUTING", "1") != "0"
        route = grouped_route if self.grouped is not None else pr2_route
        route = compiled(route) if compile_ else route
        if self.grouped is not None:
            g = self.grouped
            route = functools.partial(
                route,
                num_groups=g.num_groups,
                topk_group=g.topk_group,
                scoring_func=g.scoring_func,
                correction_bias=g.correction_bias,
                routed_scaling_factor=g.routed_scaling_factor,
            )
        self._route = route
        return self._route

    def __call__(
        self,
        hidden_states: torch.Tensor,
        gating_output: torch.Tensor,
        topk: int,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        predictor = self.predictor.weight if self.predictor is not None else None
        route = self._route or self._choose_route(hidden_states)
        weights, ids = route(hidden_states, gating_output, predictor, topk, renormalize)
        if self.capture is not None:
            self.capture.record(self.moe_layer, ids)
        return weights, ids
