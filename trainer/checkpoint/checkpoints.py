"""Checkpoints of a training run, and ``pr2-train --resume``.

A checkpoint is a directory ``OUTPUT_DIR/checkpoint-<step>`` (HF Trainer's naming):

- ``config.json``, ``generation_config.json``, ``model.safetensors``: the policy in HF format
  with the predictor tensors under the names the servers load (:meth:`Policy.export`, the file
  a push sends: it is pushed as is on resume);
- ``optimizer.{safetensors,json}``, ``predictor_optimizer.{safetensors,json}`` (pr2): the Adam
  states (:mod:`trainer.checkpoint.optim_state`: tensors and JSON, no pickle);
- ``trainer_state.safetensors``: torch (and CUDA) RNG states, the last router update (the next
  drift cosine needs it);
- ``trainer_state.json``: step, weight version, the python and numpy RNG states, the data
  position, the drop counters, the run's config.

It is written into a temporary directory inside ``OUTPUT_DIR`` (files fsynced), then renamed:
a directory named ``checkpoint-<step>`` is always complete. The newest ``keep_checkpoints``
are kept. On resume the newest one is loaded into the policy, optimizers and RNGs, its weights
are pushed to every server that does not serve them (version or content fingerprint differs:
:func:`resync_plan`), and ``metrics.jsonl``
is cut after its step, so the run goes on as if it had not stopped. Under ``torchrun`` every
rank adds its shards and RNG states to the same directory
(:mod:`trainer.checkpoint.sharded_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pr2_serve.client.retry import Retrying
from trainer.algo.drift import history_from_tensors, history_tensors
from trainer.checkpoint.optim_state import (
    load_optimizer_state,
    optimizer_files,
    save_optimizer_state,
)
from trainer.checkpoint.predictor_state import predictor_state, restore_predictor_state
from trainer.checkpoint.rng_state import rng_state, set_rng_state
from trainer.checkpoint.sharded_checkpoint import (
    load_rng,
    load_shards,
    save_shards,
    sharded,
    shared_tmp,
)
from trainer.rollouts import weight_agreement as sync
from trainer.run.progress import RunProgress

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names it."""


# -- the directory: atomic write, newest, keep-last-N ----------------------------------------------
def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``out``, oldest first, as ``(step, path)``."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in ``out`` (None: there is none)."""
    dirs = checkpoint_dirs(out)
    return dirs[-1][1] if dirs else None


def write_atomically(
    out: Path, step: int, write: Callable[[Path], None], tmp: Path | None = None
) -> Path:
    """``out/checkpoint-<step>``, filled by ``write(tmp_dir)`` in a temporary directory of
    ``out`` that is fsynced and renamed into place (replacing one of the same step).

    A crash at any point leaves either no ``checkpoint-<step>`` or a complete one; temporary
    directories of earlier crashed writes are removed first (``tmp``: a temporary directory
    made already, the one every rank of a ``torchrun`` job writes into)."""
    out.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        for old in out.glob(TMP_PREFIX + "*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}-", dir=out))
    try:
        write(tmp)
        for f in [*tmp.rglob("*")]:
            _fsync(f)
        _fsync(tmp)
        final = out / f"{PREFIX}{step}"
        if final.exists():  # (the same step again: set the old one aside, then drop it)
            aside = out / f"{TMP_PREFIX}{step}-replaced"
            final.rename(aside)
            tmp.rename(final)
            shutil.rmtree(aside)
        else:
            tmp.rename(final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(out: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0: keep all); the deleted ones."""
    dirs = checkpoint_dirs(out)
    gone = [p for _, p in dirs[:-keep]] if keep > 0 else []
    for p in gone:
        shutil.rmtree(p)
    return gone


def save_due(step: int, save_every: int, steps: int) -> bool:
    """Whether step ``step`` ends with a checkpoint: every ``save_every`` steps and the last."""
    return save_every > 0 and (step % save_every == 0 or step == steps)


# -- save ------------------------------------------------------------------------------------------
def save_checkpoint(learner, cfg, progress: RunProgress, step: int | None = None) -> Path:
    """Write the run's state after ``step`` (default: ``progress.last_step``) into
    ``cfg.output_dir``, atomically, and prune to ``cfg.keep_checkpoints``; the checkpoint.
    ``learner``: the policy, its optimizers and served predictor; ``progress``: the counters.

    Also what a run that cannot go on (no server left) calls before it exits, so that
    ``--resume`` continues it. The state must be a step boundary: a step that failed before
    its training (rollouts) is saved as the step before; one that failed after it (the push)
    as itself (write its metrics row first; resume pushes the weights the servers lack)."""
    step = progress.last_step if step is None else step
    out, policy = Path(cfg.output_dir), learner.policy
    state_dict = learner.state_dict()  # (a collective when sharded)
    shared = shared_tmp(out, step, TMP_PREFIX) if sharded(learner) else None  # (collective)

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        # the weights as served: the predictor the last push sent (scaled, look-ahead, ridge),
        # so a resume's re-sync and a load-from-path serve exactly what the run pushed
        served = learner.served_predictors()
        policy.export(tmp, cfg.replay.serves_predictor, state_dict, predictors=served)
        if shared is not None:  # every rank's shards of the policy and its Adam state
            save_shards(learner, tmp)
        else:
            save_optimizer_state(learner.opt, tmp / "optimizer")
        if learner.pred_opt is not None:
            save_optimizer_state(learner.pred_opt, tmp / "predictor_optimizer")
        meta, tensors = rng_state()
        tensors.update(history_tensors(policy.router_deltas))
        pred_meta, pred_tensors = predictor_state(learner)
        tensors.update(pred_tensors)
        tensors.update(
            {
                f"predictor_trained.{i}": w.detach().cpu()
                for i, w in enumerate(policy.predictor_parameters())
            }
        )
        save_file(tensors, str(tmp / STATE_TENSORS))
        state = {
            "format": FORMAT,
            "step": step,
            "weight_version": progress.version,
            # batches and sampling seeds are functions of (seed, step): the step is the position
            "data_position": {"kind": "step", "step": step, "seed": cfg.seed},
            "dropped_stale": progress.dropped_stale,
            "dropped_bad_routes": progress.dropped_bad_routes,
            "rng": meta,
            "predictor": pred_meta,
            "config": cfg.to_dict(),
        }
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))

    path = write_atomically(out, step, write, shared)
    prune(out, cfg.keep_checkpoints)
    return path


# -- load ------------------------------------------------------------------------------------------
def read_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``."""
    path = ckpt / STATE_JSON
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state: {e}") from e
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {FORMAT}")
    return state


def load_model_weights(policy, ckpt: Path) -> None:
    """The checkpoint's weights into ``policy`` (HF's own load conversion of
    ``model.safetensors``; predictors only where the file has them)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # HF calls the predictors "unexpected": loaded below
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    res = policy.model.load_state_dict(loaded.state_dict(), strict=False)
    predictors = set(policy.replay.predictor_state_dict())
    wrong = [k for k in res.missing_keys if k not in predictors] + list(res.unexpected_keys)
    if wrong:
        raise CheckpointError(f"{ckpt}: the model does not fit the policy: {wrong[:5]}")
    policy.replay.load_predictors(load_file(str(ckpt / "model.safetensors")))


def load_optimizer(opt: torch.optim.Optimizer | None, stem: Path) -> None:
    """An optimizer's state from ``stem`` (there must be one exactly when ``opt`` exists)."""
    path = optimizer_files(stem)[0]
    if (opt is None) != (not path.exists()):
        have = "has" if path.exists() else "lacks"
        raise CheckpointError(f"{path.parent}: {have} {path.name}, this run's replay mode does not")
    if opt is not None:
        load_optimizer_state(opt, stem)


def load_checkpoint(learner, progress: RunProgress, ckpt: Path) -> dict[str, Any]:
    """Load ``ckpt``: its counters into ``progress`` (the weight version is the servers' to
    say: :func:`resync_servers`), then :func:`load_learner`; its trainer state."""
    state = read_state(ckpt)
    progress.dropped_stale = state["dropped_stale"]
    progress.dropped_bad_routes = state["dropped_bad_routes"]
    load_learner(learner, ckpt, state)
    return state


def load_learner(learner, ckpt: Path, state: dict[str, Any]) -> None:
    """What every rank loads: the policy and its optimizer (a single process: the model file
    and ``optimizer.*``; under ``torchrun``: its shards), the replicated predictors, their
    optimizer and served state, the router update history; the RNG states last."""
    from safetensors.torch import load_file

    policy = learner.policy
    if sharded(learner):
        load_shards(learner, ckpt)
    else:
        load_model_weights(policy, ckpt)
        load_optimizer(learner.opt, ckpt / "optimizer")
    load_optimizer(learner.pred_opt, ckpt / "predictor_optimizer")
    tensors = load_file(str(ckpt / STATE_TENSORS))
    policy.router_deltas = history_from_tensors(tensors, len(policy.replay.routers))
    trained = [tensors.get(f"predictor_trained.{i}") for i in range(len(policy.replay.routers))]
    with torch.no_grad():  # the trained W_p (the model file holds the served one)
        for p, w in zip(policy.predictor_parameters(), trained, strict=True):
            if w is not None:
                p.copy_(w.to(p.device, p.dtype))
    restore_predictor_state(learner, state.get("predictor", {}), tensors)
    if sharded(learner):
        load_rng(ckpt)
    else:
        set_rng_state(state["rng"], tensors)


# -- servers ---------------------------------------------------------------------------------------
def resync_plan(
    server_versions: Sequence[int], version: int, same: Sequence[bool] | None = None
) -> tuple[int, list[int]]:
    """The version to push the checkpoint's weights as, and to which servers (indices).

    ``same[i]``: server ``i`` serves the checkpoint's weights (its fingerprints match; default:
    all do). Servers on ``version`` with the same weights keep them. Servers behind it get it
    as ``version``. When a server that must change is on ``version`` or ahead (it got a push
    after the checkpoint, or other weights under the same number), every server gets it as one
    new version past the newest, so that they all serve the same version again.

    >>> resync_plan([5, 5], 5), resync_plan([3, 5], 5), resync_plan([5, 6], 5)
    ((5, []), (5, [0]), (7, [0, 1]))
    >>> resync_plan([5, 5], 5, same=[True, False])
    (6, [0, 1])
    """
    same = [True] * len(server_versions) if same is None else list(same)
    off = [i for i, v in enumerate(server_versions) if v != version or not same[i]]
    if all(server_versions[i] < version for i in off):
        return version, off
    return max(server_versions) + 1, list(range(len(server_versions)))


def resync_servers(pool, ckpt: Path, version: int, replay: str, log=print) -> int:
    """Make every server of ``pool`` serve ``ckpt``'s weights (:func:`resync_plan`: by
    content fingerprint, not by version number alone; each call retried for
    ``--server-timeout``: a server may be coming back); the version the servers now serve.
    The server pool keeps the file as that version's, to re-sync a server that restarts
    later. ``replay``: the mode, which says whether the predictor is served."""
    addresses = [s.address for s in pool.servers]
    clients = [Retrying(s.client, s.address, pool.policy, log=log) for s in pool.servers]
    infos = [c.info() for c in clients]
    target = sync.starting_target(ckpt, replay)  # the predictor as the mode serves it
    same = [not sync.differences(i, target.fingerprints) for i in infos]
    versions = [int(i["weight_version"]) for i in infos]
    new_version, push = resync_plan(versions, version, same)
    if push:
        sync.serve_exactly(
            [clients[i] for i in push], [addresses[i] for i in push], target, new_version
        )
        log(
            f"resume: pushed {ckpt.name} as version {new_version} to "
            f"{[addresses[i] for i in push]} (they served {[versions[i] for i in push]})"
        )
    pool.pushed(ckpt / "model.safetensors", new_version, target.fingerprints)
    return new_version


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    """The fields whose value differs between a checkpoint's config and this run's, as
    ``{name: (saved, now)}`` (where a run may legitimately differ: left out)."""
    free = {"steps", "servers", "output_dir", "api_key", "resume", "save_every", "keep_checkpoints"}
    return {k: (saved.get(k), v) for k, v in current.items() if k not in free and saved.get(k) != v}


# -- metrics ---------------------------------------------------------------------------------------
def metrics_until(lines: Sequence[str], step: int) -> list[dict]:
    """The metrics rows of steps up to ``step`` (a torn last line is dropped)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            rows.append(row)
    return rows


def cut_metrics(path: Path, step: int) -> list[dict]:
    """Rewrite ``path`` (``metrics.jsonl``) without the rows after ``step`` (atomically); the
    rows kept."""
    lines = path.read_text().splitlines() if path.exists() else []
    rows = metrics_until(lines, step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


# -- resume ----------------------------------------------------------------------------------------
def check_supported(cfg, distributed: bool) -> None:
    """Checkpoint options that are valid (``distributed``: kept for the callers; every option
    works under ``torchrun``, :mod:`trainer.checkpoint.sharded_checkpoint`)."""
    if cfg.save_every < 0 or cfg.keep_checkpoints < 0:
        raise ValueError("save_every and keep_checkpoints must be >= 0")


def resume(learner, cfg, progress: RunProgress, pool, log=print) -> tuple[int, list[dict]]:
    """Continue the run in ``cfg.output_dir`` from its newest checkpoint: load it into
    ``learner`` and ``progress``, re-sync the servers of ``pool`` (``progress.version``: what
    they serve now), cut ``metrics.jsonl``; the next step and the metrics rows kept."""
    out = Path(cfg.output_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise CheckpointError(f"--resume: no {PREFIX}<step> directory in {out}")
    state = load_checkpoint(learner, progress, ckpt)
    step = state["step"]
    if changed := config_changes(state["config"], cfg.to_dict()):
        log(f"resume: this run's config differs from {ckpt.name}'s (was, now): {changed}")
    log(f"resume: {ckpt} (step {step}, version {state['weight_version']})")
    progress.version = resync_servers(pool, ckpt, state["weight_version"], cfg.replay, log)
    progress.last_step = step
    rows = cut_metrics(out / "metrics.jsonl", step)
    return step + 1, rows
