"""Data-parallel training under ``torchrun`` (DDP or FSDP2; gloo on CPU, nccl on GPU).

Rank 0 talks to the servers (rollouts, eval, pushes) and broadcasts each batch as tensors (no
pickling); every rank holds the whole batch and trains on its share of each mini-step
(:func:`trainer.loop.train_batch` with ``shard``); DDP averages the gradients, so all ranks keep
identical weights and the result equals one process on the same data.

``python -m trainer.distributed selftest OUT`` (under torchrun or alone) runs one training step
on a fixed synthetic batch and saves the updated weights: the test compares 1 and 2 processes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainConfig
from .loop import Batch, Policy, train_batch

#: The batch tensors broadcast from rank 0, in order.
BATCH_FIELDS = tuple(f.name for f in fields(Batch) if f.name != "group_size")


def setup() -> tuple[int, int, str]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
    return rank, world, device


def wrap(policy: Policy, parallel: str = "ddp") -> torch.nn.Module:
    """The module training forwards go through.

    ``ddp``: DDP over the policy parameters. ``fsdp2``: ``fully_shard`` on every decoder
    layer, then on the root (embeddings, final norm, head): each rank keeps 1/world of the
    parameters, gradients and optimizer state; FSDP2 averages gradients across ranks like DDP.
    Either way the predictors are left out (replicated, trained identically on every rank)."""
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if policy.device.startswith("cuda") else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
        predictors = set(policy.predictor_parameters())
        for layer in decoder_layers(policy.model):
            fully_shard(layer, mesh=mesh, ignored_params=predictors & set(layer.parameters()))
        fully_shard(policy.model, mesh=mesh, ignored_params=predictors)
        return policy.model
    if parallel != "ddp":
        raise ValueError(f"parallel must be 'ddp' or 'fsdp2', got {parallel!r}")
    from torch.nn.parallel import DistributedDataParallel as DDP

    policy.model._ddp_params_and_buffers_to_ignore = [
        n for n, _ in policy.model.named_parameters() if ".predictor." in n
    ]
    return DDP(policy.model)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The HF causal LM's decoder layers (``model.model.layers`` in every supported family)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no model.layers to shard")
    return layers


def full_state_dict(policy: Policy, parallel: str) -> dict[str, torch.Tensor] | None:
    """The whole state dict on rank 0 (None on the others; a collective under FSDP2).

    Under DDP every rank already holds it: rank 0 uses its own (None: export reads the model)."""
    if parallel != "fsdp2":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(
        policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return sd if dist.get_rank() == 0 else None


def broadcast_batch(batch: Batch | None, rank: int, group_size: int) -> Batch:
    """Rank 0's batch on every rank: shapes first, then each tensor."""
    shapes = torch.zeros(len(BATCH_FIELDS), 4, dtype=torch.long)
    if rank == 0:
        for i, name in enumerate(BATCH_FIELDS):
            s = getattr(batch, name).shape
            shapes[i, : len(s)] = torch.tensor(s)
            shapes[i, len(s) :] = -1
    dist.broadcast(shapes, 0)
    tensors = {}
    for i, name in enumerate(BATCH_FIELDS):
        shape = [int(x) for x in shapes[i] if x >= 0]
        dtype = torch.long if name in ("input_ids", "targets", "routes") else torch.float32
        t = getattr(batch, name).contiguous() if rank == 0 else torch.empty(shape, dtype=dtype)
        dist.broadcast(t, 0)
        tensors[name] = t
    return Batch(**tensors, group_size=group_size)


def run_distributed(cfg: TrainConfig) -> None:
    """``pr2-train`` under torchrun."""
    rank, world, device = setup()
    if rank == 0:
        from .loop import Trainer

        trainer = Trainer(cfg)
        policy = trainer.policy
    else:
        policy = Policy(cfg.model_dir, seed=cfg.seed, device=device)
    ddp = wrap(policy, cfg.parallel)
    from .loop import make_policy_optimizer

    opt = make_policy_optimizer(policy, cfg)
    pred_opt = (
        torch.optim.Adam(policy.predictor_parameters(), lr=cfg.lr * cfg.predictor_lr_multiplier)
        if cfg.replay == "pr2"
        else None
    )
    info = policy.replay
    for step in range(1, cfg.steps + 1):
        batch, head = None, {}
        if rank == 0:
            from .loop import make_batch

            samples, rewards, _ = trainer.rollout(step)
            head = {
                "step": step,
                "rollout_versions": sorted({s.weight_version for s in samples}),
                "reward_mean": float(rewards.mean()) if len(rewards) else None,
            }
            batch = make_batch(
                samples, rewards, cfg.samples_per_prompt, info.num_moe_layers, info.top_k
            )
        batch = broadcast_batch(batch, rank, cfg.samples_per_prompt)
        m = train_batch(policy, batch, cfg, opt, pred_opt, model=ddp, shard=(rank, world))
        state_dict = full_state_dict(policy, cfg.parallel)  # every rank (FSDP2 gathers)
        if rank == 0:
            m = {**head, **m}
            m["time_push"] = trainer.push(state_dict)
            m["pushed_version"] = trainer.version
            with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            print(json.dumps({k: m[k] for k in ("step", "loss", "pushed_version")}), flush=True)
        dist.barrier()
    dist.destroy_process_group()


def selftest(out: str, model_dir: str, parallel: str = "ddp") -> None:
    """One training step on a fixed synthetic batch; rank 0 saves loss and weights (the
    checkpoint the trainer would push, through the same export)."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        rank, world, _ = setup()
    policy = Policy(model_dir, seed=0)
    batch = synthetic_batch(policy)
    cfg = TrainConfig(
        replay="pr2",
        off_policy_steps=2,
        prompts_per_batch=4,
        lr=1e-3,
        samples_per_prompt=2,
        servers=["http://unused"],
    )
    model = wrap(policy, parallel) if world > 1 else None
    opt = torch.optim.Adam(policy.policy_parameters(), lr=cfg.lr)
    pred_opt = torch.optim.Adam(policy.predictor_parameters(), lr=cfg.lr * 10)
    m = train_batch(policy, batch, cfg, opt, pred_opt, model=model, shard=(rank, world))
    loss = torch.tensor(m["loss"])
    if world > 1:
        dist.all_reduce(loss)  # each rank's loss is world x its share of the token sum
        loss /= world
    state_dict = full_state_dict(policy, parallel) if world > 1 else None
    if rank == 0:
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = policy.export(Path(tmp), with_predictor=True, state_dict=state_dict)
            shutil.copy(path, f"{out}.safetensors")
        Path(f"{out}.json").write_text(
            json.dumps(
                {
                    "loss": float(loss),
                    "predictor_loss": m["predictor_loss"],
                    "grad_norm": m["grad_norm"],
                }
            )
        )
    if world > 1:
        dist.destroy_process_group()


def synthetic_batch(policy: Policy) -> Batch:
    """8 sequences (4 groups of 2) sampled from the policy, with its own routes as 'server'
    routes: deterministic, no server needed."""
    from .ppo import grpo_advantages

    g = torch.Generator().manual_seed(0)
    b, t = 8, 12
    input_ids = torch.randint(0, 256, (b, t + 1), generator=g)
    valid = torch.ones(b, t)
    valid[5, 9:] = 0
    loss_mask = torch.zeros(b, t)
    loss_mask[:, 4:] = 1
    loss_mask *= valid
    from .replay import RoutingControl

    ctl = RoutingControl(record=True)
    with torch.no_grad(), policy.replay.control(ctl):
        logits = policy.model(input_ids=input_ids[:, :-1].to(policy.device)).logits
    from .ppo import token_logprobs

    lp = token_logprobs(logits, input_ids[:, 1:].to(policy.device)).cpu()
    routes = ctl.recorded_routes().cpu().reshape(b, t, policy.replay.num_moe_layers, -1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    return Batch(
        input_ids[:, :-1],
        input_ids[:, 1:],
        loss_mask,
        valid,
        lp * loss_mask,
        routes,
        grpo_advantages(rewards, 2),
        2,
    )


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "selftest":
        selftest(*sys.argv[2:])
    else:
        raise SystemExit("usage: python -m trainer.distributed selftest OUT MODEL_DIR [ddp|fsdp2]")
