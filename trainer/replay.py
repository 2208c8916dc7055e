"""Routing control for the trainer's HF transformers MoE model: replay, record, natural.

Every MoE router (``model.model.layers[i].mlp.gate`` in transformers 5.x, all four families)
gets its ``forward`` replaced by one that, per the active :class:`RoutingControl`:

- **force** given expert ids (routing replay: R2, R3, PR2) -- gating is recomputed from the
  *current* router's logits gathered at those ids with the family's normalisation, so gradients
  still reach the router (:func:`pr2_serve.routing.gate_weights`, the same function the server's
  routers use);
- **natural** top-k, optionally on ``z + W_p h`` (the predictor-adjusted selection the server
  makes) -- still gated by the unadjusted ``z``;
- **record** the router input ``h``, logits ``z`` and chosen ids per layer.

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

from pr2_serve.routing import gate_weights, select_experts

__all__ = ["MoEReplay", "RoutingControl"]


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

    def __init__(self, model: nn.Module) -> None:
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
            router = getattr(block, "gate", None)
            if router is None or not hasattr(router, "top_k"):
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
        # transformers' fused expert kernels are numerically a hair off eager; use eager.
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("eager")

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


def _make_forward(replay: MoEReplay, ordinal: int, predictor: nn.Linear):
    def forward(self, hidden_states: torch.Tensor):
        h = hidden_states.reshape(-1, self.hidden_dim)
        z = F.linear(h, self.weight)
        ctl = replay._control or RoutingControl()
        if ctl.forced_ids is not None:
            ids = ctl.forced_ids[:, ordinal].to(device=z.device, dtype=torch.long)
            if ids.shape[0] != z.shape[0]:
                raise ValueError(f"forced ids have {ids.shape[0]} tokens, the batch {z.shape[0]}")
        else:
            w_p = predictor.weight if ctl.use_predictor else None
            ids = select_experts(z, h, w_p, self.top_k)
        weights = gate_weights(z.float(), ids, replay.renormalize(self)).to(z.dtype)
        if ctl.record:
            ctl.hidden.append(h)
            ctl.logits.append(z)
            ctl.ids.append(ids)
        return z, weights, ids

    return forward
