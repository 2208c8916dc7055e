"""Data-parallel training under ``torchrun`` (DDP or FSDP2; gloo on CPU, nccl on GPU).

Rank 0 runs the same :class:`trainer.run.loop.Trainer` as a single process (rollouts, eval,
pushes, metrics) with a :class:`ShardedLearner`: it broadcasts each batch as tensors (no
pickling), every rank holds the whole batch and trains on its share of each mini-step
(:meth:`trainer.algo.train_step.Learner.train_batch` with ``shard``); DDP averages the
gradients, so all ranks keep identical weights and the result equals one process on the same
data. The other ranks make the matching collectives (:meth:`ShardedLearner.follow_step`).

``python -m trainer.run.distributed selftest OUT`` (under torchrun or alone) runs one training step
on a fixed synthetic batch and saves the updated weights: the test compares 1 and 2 processes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from pathlib import Path
from typing import get_args

import torch
import torch.distributed as dist

from trainer.algo.batch import Batch
from trainer.algo.train_step import Learner
from trainer.run.config import Parallel, TrainConfig
from trainer.run.policy import Policy
from trainer.run.precision import resolve_device

#: The batch tensors broadcast from rank 0, in order, and their dtypes.
BATCH_FIELDS = Batch.tensor_names()
BATCH_DTYPES = {
    name: torch.long if name in ("input_ids", "targets", "routes") else torch.float32
    for name in BATCH_FIELDS
}


def setup(device: str = "auto") -> tuple[int, int, str]:
    """Join the ``torchrun`` job: ``(rank, world, device)``. ``device`` (``--device``):
    ``auto`` uses nccl and one GPU per local rank when CUDA is visible, else gloo on the CPU."""
    # Before the process group exists (see `teardown`): these modules give their functions
    # `group=dist.group.WORLD` as a default argument, evaluated on import; imported after
    # init_process_group (DDP imports torch._dynamo, which imports torch.distributed.nn) the
    # defaults hold the live default group forever and destroy_process_group cannot free it.
    import torch._dynamo
    import torch.distributed.fsdp
    import torch.distributed.nn  # noqa: F401 (imported for the reason above)

    backend = "nccl" if resolve_device(device).startswith("cuda") else "gloo"
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
    if parallel not in get_args(Parallel):
        raise ValueError(f"parallel must be one of {get_args(Parallel)}, got {parallel!r}")
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


def broadcast_batch(batch: Batch | None, rank: int, group_size: int) -> Batch | None:
    """Rank 0's batch (or None) on every rank: presence and shapes first, then each tensor."""
    names = list(BATCH_FIELDS)
    shapes = torch.full((len(names) + 1, 4), -1, dtype=torch.long)  # last row: batch present
    if rank == 0:
        shapes[-1, 0] = int(batch is not None)
        for i, t in enumerate(batch.tensors().values() if batch is not None else ()):
            shapes[i, : t.dim()] = torch.tensor(t.shape)
    dist.broadcast(shapes, 0)
    if shapes[-1, 0] == 0:
        return None
    tensors = {}
    for i, name in enumerate(names):
        shape = [int(x) for x in shapes[i] if x >= 0]
        dtype = BATCH_DTYPES[name]
        t = getattr(batch, name).contiguous() if rank == 0 else torch.empty(shape, dtype=dtype)
        dist.broadcast(t, 0)
        tensors[name] = t
    return Batch(**tensors, group_size=group_size)


class ShardedLearner(Learner):
    """One rank's learner in a ``torchrun`` job: the policy wrapped for DDP / FSDP2, trained on
    this rank's share of each mini-step of rank 0's batch.

    Every method is a collective: rank 0's :meth:`Trainer.step` calls :meth:`train` and
    :meth:`state_dict` once per step, the other ranks call :meth:`follow_step`, which makes the
    same calls in the same order."""

    def __init__(self, policy: Policy, cfg: TrainConfig) -> None:
        model = wrap(policy, cfg.parallel)  # before the optimizers: FSDP2 swaps the parameters
        super().__init__(policy, cfg, model, shard=(dist.get_rank(), dist.get_world_size()))

    def train(self, batch: Batch | None, rollout_predictors: dict | None = None) -> dict:
        """(``rollout_predictors``: rank 0's; the metrics of the other ranks are not used.)"""
        batch = broadcast_batch(batch, self.shard[0], self.cfg.samples_per_prompt)
        return super().train(batch, rollout_predictors)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return full_state_dict(self.policy, self.cfg.parallel)

    def follow_step(self, step: int) -> None:
        """A rank other than 0: the collectives of rank 0's step ``step`` (its checkpoint
        too, when one is due)."""
        from trainer.checkpoint.checkpoints import save_due

        self.train(None)
        self.state_dict()
        if save_due(step, self.cfg.save_every, self.cfg.steps):
            self.follow_save(step)

    def follow_save(self, step: int) -> None:
        """A rank other than 0: its part of rank 0's
        :func:`trainer.checkpoint.checkpoints.save_checkpoint`
        (the gather of the export, then its shards into the shared directory)."""
        from trainer.checkpoint.checkpoints import TMP_PREFIX
        from trainer.checkpoint.sharded_checkpoint import save_shards, shared_tmp

        self.state_dict()
        save_shards(self, shared_tmp(Path(self.cfg.output_dir), step, TMP_PREFIX))

    def follow_resume(self) -> int:
        """A rank other than 0: load the newest checkpoint as rank 0 does (its shards, the
        replicated predictor state, its own RNG); the next step."""
        from trainer.checkpoint.checkpoints import (
            CheckpointError,
            latest_checkpoint,
            load_learner,
            read_state,
        )

        ckpt = latest_checkpoint(Path(self.cfg.output_dir))
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {self.cfg.output_dir}")
        state = read_state(ckpt)
        load_learner(self, ckpt, state)
        return state["step"] + 1


def run_distributed(cfg: TrainConfig) -> None:
    """``pr2-train`` under torchrun: rank 0 runs the :class:`Trainer` (rollouts, pushes,
    evaluation, metrics) with a :class:`ShardedLearner`; the other ranks follow its steps."""
    from trainer.checkpoint.checkpoints import check_supported
    from trainer.run.loop import Trainer

    check_supported(cfg, distributed=True)  # (on every rank, before any collective)
    rank, _, device = setup(cfg.device)
    learner = ShardedLearner(Policy.from_config(cfg, device=device), cfg)
    if rank == 0:
        keys = ("step", "loss", "pushed_version")
        with Trainer(cfg, learner=learner) as trainer:
            trainer.run(lambda m: print(json.dumps({k: m.get(k) for k in keys}), flush=True))
    else:
        start = learner.follow_resume() if cfg.resume else 1
        for step in range(start, cfg.steps + 1):
            learner.follow_step(step)
    teardown(learner)  # not on an error: the other ranks may be inside a collective


def teardown(learner: Learner) -> None:
    """Leave the job together and free the process group while the interpreter is alive.

    The race this fixes (``terminate called without an active exception``, SIGABRT, seen on
    rank 1 of the DDP self-test while rank 0 was still exporting): the gloo backend was never
    freed. ``destroy_process_group`` only drops torch's own references; the default group was
    also held by DDP's reducer and -- for good -- by the ``group=dist.group.WORLD`` default
    arguments of ``torch.distributed.nn`` (imported through torch._dynamo when DDP was built,
    after init_process_group). So gloo's worker and TCP-loop threads stayed alive into
    interpreter shutdown, exactly as if the group had never been destroyed (pytorch#190489):
    a worker still releasing the last collective's work (tensors with Python objects) then
    needs the GIL while Python finalizes, and the thread is torn down inside a noexcept
    destructor -> std::terminate. It only showed when a rank exited right after its last
    collective on a loaded machine, hence flaky (the abort did not reproduce here in ~45
    runs; the leaked backend does, every time). Fix: `setup` imports those modules before
    the group exists; here a barrier (no rank tears down while another still works, and every
    rank's last collective is done), then the DDP wrapper and the optimizers are released
    (and collected) before the group is destroyed, so under DDP the backend's threads are
    joined here (the self-test checks that no gloo thread is left). Under FSDP2, something
    inside ``fully_shard`` (not found: invisible to ``gc``) still holds the group, so its
    threads live on until exit; the barrier still makes every rank leave together."""
    dist.barrier()
    learner.model = learner.opt = learner.pred_opt = None  # DDP's reducer holds the group
    gc.collect()
    dist.destroy_process_group()


def native_threads() -> list[str]:
    """This process's OS threads by name (Linux ``/proc``; empty elsewhere)."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            names.append(task.read_text().strip())
    return sorted(names)


def selftest(out: str, model_dir: str, parallel: str = "ddp") -> None:
    """One training step on a fixed synthetic batch; rank 0 saves loss and weights (the
    checkpoint the trainer would push, through the same export). Under torchrun the step goes
    through :class:`ShardedLearner` (rank 0's batch broadcast, as in training)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = setup()[0] if distributed else 0
    policy = Policy(model_dir, seed=0)
    batch = synthetic_batch(policy)
    cfg = TrainConfig(
        replay="pr2",
        off_policy_steps=2,
        prompts_per_batch=4,
        lr=1e-3,
        predictor="learned",
        predictor_lr_ratio=10,
        samples_per_prompt=2,
        servers=["http://unused"],
        parallel=parallel,
    )
    learner = ShardedLearner(policy, cfg) if distributed else Learner(policy, cfg)
    m = learner.train(batch)
    loss = torch.tensor(m["loss"])
    if distributed:
        dist.all_reduce(loss)  # each rank's loss is world x its share of the token sum
        loss /= dist.get_world_size()
    state_dict = learner.state_dict()
    if rank == 0:
        from safetensors.torch import save_file

        save_file(policy.checkpoint_tensors(True, state_dict), f"{out}.safetensors")
        keys = ("predictor_loss", "grad_norm")
        Path(f"{out}.json").write_text(json.dumps({"loss": float(loss), **{k: m[k] for k in keys}}))
    if distributed:
        teardown(learner)
        # what is still running as this rank exits (the test wants no gloo thread left)
        Path(f"{out}.rank{rank}.threads.json").write_text(json.dumps(native_threads()))


def synthetic_batch(policy: Policy) -> Batch:
    """8 sequences (4 groups of 2) sampled from the policy, with its own routes as 'server'
    routes: deterministic, no server needed."""
    from trainer.algo.ppo import grpo_advantages

    g = torch.Generator().manual_seed(0)
    b, t = 8, 12
    input_ids = torch.randint(0, 256, (b, t + 1), generator=g)
    valid = torch.ones(b, t)
    valid[5, 9:] = 0
    loss_mask = torch.zeros(b, t)
    loss_mask[:, 4:] = 1
    loss_mask *= valid
    from trainer.algo.replay import RoutingControl

    ctl = RoutingControl(record=True)
    with torch.no_grad(), policy.replay.control(ctl):
        logits = policy.model(input_ids=input_ids[:, :-1].to(policy.device)).logits
    from trainer.algo.ppo import token_logprobs

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
        torch.zeros(b),
        2,
    )


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "selftest":
        selftest(*sys.argv[2:])
    else:
        raise SystemExit(
            "usage: python -m trainer.run.distributed selftest OUT MODEL_DIR [ddp|fsdp2]"
        )
