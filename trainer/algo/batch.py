"""One rollout batch as right-padded tensors (what the old pass and the mini-steps consume)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from pr2_serve.core.route_protocol import route_rows
from trainer.algo.ppo import grpo_advantages


@dataclass
class Batch:
    """Right-padded tensors of one rollout batch (``B`` samples, ``T = max(P + O) - 1``)."""

    input_ids: torch.Tensor  # [B, T] prompt + output minus the last token
    targets: torch.Tensor  # [B, T] next tokens
    loss_mask: torch.Tensor  # [B, T] 1 on positions predicting generated tokens
    valid: torch.Tensor  # [B, T] 1 on real (non-pad) positions
    server_logprobs: torch.Tensor  # [B, T] at loss positions
    routes: torch.Tensor  # [B, T, L, k] server routes (pad rows: 0..k-1)
    advantages: torch.Tensor  # [B]
    staleness: torch.Tensor  # [B] weight versions between the sample's and the trainer's
    group_size: int

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        """The tensor fields (all but ``group_size``), in field order."""
        return tuple(f.name for f in fields(cls) if f.name != "group_size")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name, in field order."""
        return {name: getattr(self, name) for name in self.tensor_names()}

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self.tensors().values()), self.group_size)

    def select(self, idx: torch.Tensor) -> Batch:
        return Batch(*(t[idx] for t in self.tensors().values()), self.group_size)


def make_batch(
    samples,
    rewards: torch.Tensor,
    group_size: int,
    num_layers: int,
    top_k: int,
    version: int | None = None,
) -> Batch:
    """Tensors from server samples (ordered prompt-major, ``group_size`` per prompt);
    ``version``: the trainer's weight version (each sample's staleness is counted from it;
    None: every sample fresh)."""
    lengths = [route_rows(len(s.prompt_token_ids), len(s.output_token_ids)) for s in samples]
    b, t = len(samples), max(lengths)
    input_ids = torch.zeros(b, t, dtype=torch.long)
    targets = torch.zeros(b, t, dtype=torch.long)
    loss_mask = torch.zeros(b, t)
    valid = torch.zeros(b, t)
    server_lp = torch.zeros(b, t)
    routes = torch.arange(top_k).expand(b, t, num_layers, top_k).clone()
    for i, s in enumerate(samples):
        seq = list(s.prompt_token_ids) + list(s.output_token_ids)
        n, p = lengths[i], len(s.prompt_token_ids)
        input_ids[i, :n] = torch.tensor(seq[:-1])
        targets[i, :n] = torch.tensor(seq[1:])
        loss_mask[i, p - 1 : n] = 1
        valid[i, :n] = 1
        server_lp[i, p - 1 : n] = torch.tensor(s.logprobs, dtype=torch.float32)
        routes[i, :n] = torch.from_numpy(s.routes.astype(np.int64))
    return Batch(
        input_ids,
        targets,
        loss_mask,
        valid,
        server_lp,
        routes,
        grpo_advantages(rewards, group_size),
        torch.tensor(
            [0 if version is None else version - s.weight_version for s in samples],
            dtype=torch.float32,
        ),
        group_size,
    )


def flat_routes(routes: torch.Tensor) -> torch.Tensor:
    """``[B, T, L, k]`` -> ``[B * T, L, k]`` (the token order HF flattens hidden states in)."""
    b, t, layers, k = routes.shape
    return routes.reshape(b * t, layers, k)
