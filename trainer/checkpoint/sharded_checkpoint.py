"""Checkpoints under ``torchrun`` (DDP and FSDP2), with ``torch.distributed.checkpoint``.

Rank 0 writes a checkpoint as a single process does (the gathered HF export that pushes and
``--resume`` re-syncs send, the trainer state, the replicated predictors and their optimizer).
Beside it every rank writes, into the same directory:

- ``dcp/``: its share of the policy and of the policy's Adam state (FSDP2: its shards; DDP:
  replicated, stored once), through ``torch.distributed.checkpoint`` (DCP);
- ``rng-rank<r>.safetensors`` / ``.json``: its own python, numpy and torch RNG states.

Every function here is a collective: rank 0 calls it from :mod:`trainer.checkpoint.checkpoints`,
the other
ranks from :meth:`trainer.run.distributed.ShardedLearner.follow_step` / ``follow_resume``, in the
same order. The directory is written under a temporary name all ranks agree on, and rank 0
renames it once every rank is done (a ``checkpoint-<step>`` is complete or absent).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

__all__ = ["load_rng", "load_shards", "save_shards", "sharded", "shared_tmp"]


def shared_tmp(out: Path, step: int, tmp_prefix: str) -> Path:
    """The temporary directory of step ``step``'s checkpoint, made by rank 0 (earlier
    crashed writes removed first) and seen by every rank."""
    tmp = out / f"{tmp_prefix}{step}-ranks"
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob(tmp_prefix + "*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    return tmp


def _state(learner) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(learner.model, learner.opt)


def save_shards(learner, tmp: Path) -> None:
    """This rank's policy and optimizer shards and RNG states into ``tmp``; returns when every
    rank has written its files."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from trainer.checkpoint.rng_state import rng_state

    rank = dist.get_rank()
    meta, tensors = rng_state()
    save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(meta))
    model_sd, optim_sd = _state(learner)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    dist.barrier()


def load_shards(learner, ckpt: Path) -> None:
    """This rank's policy and optimizer shards from ``ckpt/dcp`` (into the wrapped model and
    the optimizer as they are sharded now); the RNG states are set by :func:`load_rng`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from trainer.checkpoint.checkpoints import CheckpointError

    if not (ckpt / "dcp").is_dir():
        raise CheckpointError(f"{ckpt}: no dcp/ (written by a single process: resume it alone)")
    model_sd, optim_sd = _state(learner)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    set_state_dict(
        learner.model,
        learner.opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )
    dist.barrier()


def load_rng(ckpt: Path) -> None:
    """This rank's own RNG states (last: nothing may draw after them)."""
    from safetensors.torch import load_file

    from trainer.checkpoint.rng_state import set_rng_state

    rank = dist.get_rank()
    meta = json.loads((ckpt / f"rng-rank{rank}.json").read_text())
    set_rng_state(meta, load_file(str(ckpt / f"rng-rank{rank}.safetensors")))


def sharded(learner) -> bool:
    """Whether ``learner`` is one rank of a data-parallel job."""
    return learner.shard[1] > 1 and dist.is_initialized()
