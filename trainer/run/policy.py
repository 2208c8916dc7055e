"""The policy: the HF model of the served checkpoint with routing control and evolution
predictors, its two optimizers, and its export in the checkpoint format the servers load.

Precision (``dtype``) is bf16 autocast over fp32 master weights, or plain fp32: see
:mod:`trainer.run.precision` for the choice and why. Export is in memory
(:mod:`trainer.checkpoint.export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.algo.ppo import token_logprobs
from trainer.algo.replay import MoEReplay, RoutingControl
from trainer.checkpoint.export import checkpoint_tensors
from trainer.run.config import TrainConfig
from trainer.run.precision import autocast, resolve_device

__all__ = [
    "Policy",
    "forward_logprobs",
    "full_tensor",
    "make_policy_optimizer",
    "make_predictor_optimizer",
    "predictor_lr",
]


class Policy:
    """The HF model of the served checkpoint, with routing control and predictors.

    ``device``: ``cpu``, ``cuda[:i]`` or ``auto``; ``dtype``: the training forwards'
    precision, ``float32`` or ``bfloat16`` (autocast; the weights stay fp32);
    ``experts_implementation``: transformers' (``grouped_mm`` or ``eager``, see
    :class:`~trainer.run.config.TrainConfig`)."""

    def __init__(
        self,
        model_dir: str,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        experts_implementation: str = TrainConfig.experts_implementation,
    ) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)
        self.model_dir = model_dir
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # HF calls the predictors "unexpected": we load them
        try:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        device = resolve_device(device)
        autocast(device, dtype)  # checks dtype before anything moves
        self.model.to(device)
        self.replay = MoEReplay(self.model, experts_implementation)
        tensors = {}
        for f in Path(model_dir).glob("*.safetensors"):
            tensors.update(load_file(str(f)))
        self.replay.load_predictors(tensors)
        self.device, self.dtype = device, dtype
        # the last batches' router updates, newest first (trainer.algo.drift)
        self.router_deltas: list[list[torch.Tensor]] = []

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        pred = {id(p) for m in self.replay.predictors for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in pred]

    def predictor_parameters(self) -> list[torch.nn.Parameter]:
        return [m.weight for m in self.replay.predictors]

    def router_weights(self) -> list[torch.Tensor]:
        """Each MoE router's weight as a whole tensor (gathered when FSDP2 shards it: a
        collective, so every rank calls this at the same point)."""
        return [full_tensor(r.weight) for r in self.replay.routers]

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: str | None = None) -> Policy:
        """The policy of ``cfg`` (``device``: a rank's own, overriding ``cfg.device``)."""
        device = device or cfg.device
        return cls(cfg.model_dir, cfg.seed, device, cfg.dtype, cfg.experts_implementation)

    def autocast(self):
        """The precision context of a training forward (see :mod:`trainer.run.precision`)."""
        return autocast(self.device, self.dtype)

    def checkpoint_tensors(
        self,
        with_predictor: bool,
        state_dict: dict | None = None,
        predictors: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{checkpoint name: CPU tensor}`` of the weights, in memory (no file).

        ``state_dict``: the full (gathered) state dict when the model is sharded.
        ``predictors``: per MoE layer, the predictor to send instead of the trained one (the
        served ``alpha x W_p`` or look-ahead: ``Learner.served_predictors``)."""
        out = checkpoint_tensors(self.model, state_dict, with_predictor)
        if with_predictor and predictors is not None:
            names = list(self.replay.predictor_state_dict())
            for name, w in zip(names, predictors, strict=True):
                out[name] = w.detach().to("cpu", out[name].dtype).contiguous()
        return out

    def export(
        self,
        out_dir: Path,
        with_predictor: bool,
        state_dict: dict | None = None,
        predictors: list[torch.Tensor] | None = None,
    ) -> Path:
        """The weights as ``out_dir/model.safetensors`` (+ the model's config files): an HF
        checkpoint directory, written in one pass (``predictors``: see
        :meth:`checkpoint_tensors`)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(out_dir)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(out_dir)
        from safetensors.torch import save_file

        path = out_dir / "model.safetensors"
        tensors = self.checkpoint_tensors(with_predictor, state_dict, predictors)
        save_file(tensors, path, {"format": "pt"})
        return path


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor when ``t`` is a (sharded) DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def forward_logprobs(
    policy: Policy, batch, ctl: RoutingControl, model: torch.nn.Module | None = None
) -> torch.Tensor:
    """Per-position log-probs of ``batch.targets`` under ``ctl``'s routing, ``[B, T]``.

    ``model``: the module the forward goes through (a DDP wrapper); default the policy's."""
    with policy.replay.control(ctl), policy.autocast():
        logits = (model or policy.model)(input_ids=batch.input_ids.to(policy.device)).logits
    return token_logprobs(logits, batch.targets.to(policy.device))


def make_policy_optimizer(policy: Policy, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the policy; router weights at ``lr x router_lr_multiplier``.

    Built after any DDP/FSDP2 wrapping (FSDP2 replaces the parameters by sharded ones)."""
    routers = {id(r.weight) for r in policy.replay.routers}
    params = policy.policy_parameters()
    groups = [
        {"params": [p for p in params if id(p) not in routers], "lr": cfg.lr},
        {
            "params": [p for p in params if id(p) in routers],
            "lr": cfg.lr * cfg.router_lr_multiplier,
        },
    ]
    return torch.optim.Adam(groups)


def make_predictor_optimizer(policy: Policy, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """Adam over the predictors (pr2 with the learned predictor only, else None) at
    :func:`predictor_lr`; AdamW when ``cfg.predictor_weight_decay`` is set."""
    if not cfg.replay.serves_predictor or cfg.predictor != "learned":
        return None
    params, lr = policy.predictor_parameters(), predictor_lr(cfg)
    if cfg.predictor_weight_decay:
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.predictor_weight_decay)
    return torch.optim.Adam(params, lr=lr)


def predictor_lr(cfg: TrainConfig) -> float:
    """The learned predictor's lr: ``predictor_lr_ratio`` x the router's lr."""
    return cfg.predictor_lr_ratio * cfg.lr * cfg.router_lr_multiplier
