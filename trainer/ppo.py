"""PPO/GRPO math: group-normalised advantages, clipped objective, token log-probs. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PPOStats", "grpo_advantages", "ppo_loss", "token_logprobs"]


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's reward normalised within its prompt's group of ``group_size``.

    ``rewards`` is ``[num_prompts * group_size]`` ordered prompt-major. A group whose rewards
    are all equal gets advantage 0 (nothing to learn from it).
    """
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)
    return adv.view(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` per position: ``[..., V], [...] -> [...]`` (fp32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class PPOStats:
    loss: float
    clip_fraction: float
    approx_kl: float
    ratio_mean: float


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, PPOStats]:
    """Clipped PPO objective, averaged over valid tokens.

    Args:
        logprobs, old_logprobs, mask: ``[B, T]`` (mask 1 on generated tokens).
        advantages: ``[B]`` per sequence (GRPO) or ``[B, T]`` per token.
        normalizer: divide the token sum by this instead of ``mask.sum()`` (data parallelism:
            the global token count, so every rank's loss adds up to the global mean).

    Returns:
        ``(loss, stats)``; ``loss = -sum(min(r A, clip(r, 1-e, 1+e) A) * mask) / normalizer``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    n = mask.sum() if normalizer is None else normalizer
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        clip_frac = (((ratio - 1.0).abs() > clip_eps).to(mask.dtype) * mask).sum() / count
        approx_kl = (((ratio - 1.0) - log_ratio) * mask).sum() / count  # k3 estimator
        ratio_mean = (ratio * mask).sum() / count
    return loss, PPOStats(float(loss), float(clip_frac), float(approx_kl), float(ratio_mean))
