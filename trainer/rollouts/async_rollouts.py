"""Asynchronous rollouts with bounded staleness (``pr2-train --max-staleness K``).

With ``K = 0`` the loop is synchronous: rollout, train, push, rollout on the new version. With
``K >= 1`` the rollouts of steps ``t+1 .. t+K`` are requested (:class:`Prefetcher`, one
background thread, one request at a time in step order, through the trainer's
:class:`~trainer.rollouts.server_pool.ServerPool` and its retries) as soon as step ``t``'s are
collected, so
the servers generate while the trainer scores, trains and pushes. Each request asks for the
version the trainer has when it is made (``min_weight_version``); requests in flight during a
push finish on the version they started on (the server applies a push between requests), so a
batch trained at version ``v`` was generated at ``v - K`` or later. The trainer's screening
(:func:`trainer.run.loop.screen_groups`) still drops and counts the groups with a sample more than
``K`` versions old (e.g. after an extra push). Stale samples are trained with decoupled PPO
(:func:`trainer.algo.ppo.decoupled_ppo_loss`): their staleness travels in the batch.

What routed a sample on the server is the predictor of *its* version: :class:`PredictorHistory`
keeps the last ``K + 1`` pushed predictors (as the push exported them) for the route-agreement
diagnostics (:func:`trainer.algo.version_metrics.by_staleness`).

Edges: the last step requests nothing past ``cfg.steps``; after ``--resume`` nothing is
pending, so the first step requests its rollouts itself (as step 1 does); :meth:`close` cancels
what has not started and waits for the request in flight (no thread outlives the trainer); a
rollout that failed in the background raises when its step takes it, in the trainer's thread
(:class:`~trainer.rollouts.server_pool.NoServerLeft` too: the trainer's loop catches it there and
writes its checkpoint, never the background thread).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "AsyncRollouts",
    "PredictorHistory",
    "Prefetcher",
    "lag_metrics",
]


class Prefetcher:
    """Jobs run ahead of the step that needs them, one at a time in submission order, in one
    background thread (none with ``depth`` 0)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._pending: dict[int, tuple[Any, cf.Future]] = {}
        self._executor = (
            cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pr2-rollouts")
            if depth
            else None
        )

    def submit(self, step: int, key: Any, job: Callable[[], Any]) -> None:
        """Run ``job()`` in the background for ``step`` (``key``: handed back by :meth:`take`)."""
        if self._executor is None:
            raise RuntimeError("a Prefetcher of depth 0 runs nothing ahead")
        self._pending[step] = (key, self._executor.submit(_timed, job))

    def pending(self, step: int) -> bool:
        return step in self._pending

    def take(self, step: int) -> tuple[Any, Any, float] | None:
        """``(key, job result, seconds the job ran)`` of ``step`` once done (its error raised
        here); None when nothing was submitted for it."""
        if step not in self._pending:
            return None
        key, fut = self._pending.pop(step)
        result, seconds = fut.result()
        return key, result, seconds

    def close(self) -> None:
        """Cancel the jobs not started, wait for the one running."""
        for _, fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _timed(job: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return job(), time.perf_counter() - t0


class PredictorHistory:
    """The predictor each recent weight version was served with: the last ``keep`` pushed.

    Recorded from what a push exported (``{checkpoint name: tensor}``): a push without the
    predictor tensors (modes other than pr2) leaves the servers on zeros, recorded as None
    (``W_p = 0`` for the diagnostics)."""

    def __init__(self, names: Sequence[str], keep: int, device: str | torch.device = "cpu"):
        self.names, self.keep, self.device = list(names), keep, device
        self._by_version: dict[int, list[torch.Tensor] | None] = {}

    def record(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        have = all(n in tensors for n in self.names)
        self._by_version[version] = (
            [tensors[n].detach().to(self.device, copy=True) for n in self.names] if have else None
        )
        for v in [v for v in self._by_version if v <= version - self.keep]:
            del self._by_version[v]

    def versions(self) -> list[int]:
        return sorted(self._by_version)

    def by_staleness(self, version: int) -> dict[int, list[torch.Tensor] | None]:
        """``{versions behind `version`: predictor}`` of the versions kept."""
        return {version - v: p for v, p in self._by_version.items()}


def lag_metrics(samples: Sequence, version: int) -> dict:
    """How many versions the kept samples are behind ``version`` (the one trained on)."""
    lags = [version - s.weight_version for s in samples]
    return {"rollout_lag_max": max(lags) if lags else None}


#: ``request(prompts, step, min_version)``: every prompt's group of samples, of weight version
#: ``min_version`` or newer (:meth:`trainer.run.loop.Trainer.request_rollouts`)
Request = Callable[[list[list[int]], int, int], list[list]]


class AsyncRollouts:
    """The trainer's side of ``--max-staleness`` (see the module docstring): what it takes at
    each step, what it requests ahead, and the pushed predictors by version.

    ``learner``: its policy names and places the predictors, its served predictor is the
    first recorded; ``source``: the prompts of each step; ``request``: :data:`Request`."""

    def __init__(self, cfg, learner, source, request: Request) -> None:
        self.steps, self.learner, self.source, self.request = cfg.steps, learner, source, request
        self.prefetcher = Prefetcher(cfg.max_staleness)
        policy = learner.policy
        names = list(policy.replay.predictor_state_dict())
        self.predictors = PredictorHistory(names, cfg.max_staleness + 1, policy.device)

    def start(self, version: int) -> None:
        """What the servers serve when the run (or its resume) starts: ``version``. (The served
        predictor only: an export here would gather FSDP2 shards on rank 0 alone, a collective
        the other ranks never join.)"""
        served = self.learner.served_predictors()  # None outside pr2
        names = self.predictors.names
        tensors = {} if served is None else dict(zip(names, served, strict=True))
        self.predictors.record(version, tensors)

    def pushed(self, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self.predictors.record(version, tensors)

    def own(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a push sends, as the server pool keeps them for re-syncs: copies when
        rollouts run ahead (a re-sync may then run in the background request while the next
        step trains, and the export views the policy's parameters on a CPU)."""
        if not self.prefetcher.depth:
            return tensors
        return {name: t.clone() for name, t in tensors.items()}

    def take(self, step: int, version: int) -> tuple[Any, list[list], float | None]:
        """``(prompts, groups, seconds the background request ran or None)`` of ``step``:
        requested ahead, or now (at ``version``, the trainer's); then the next steps' requests
        are made. A background request's failure raises here, in the trainer's thread."""
        got = self.prefetcher.take(step)
        if got is None:
            prompts = self.source.batch(step)
            got = (prompts, self.request(prompts.ids, step, version), None)
        self.ahead(step, version)
        return got

    def ahead(self, step: int, version: int) -> None:
        """Request the rollouts of steps ``step+1 .. step+K`` (up to ``cfg.steps``) not yet
        requested, at least at ``version``."""
        last = min(step + self.prefetcher.depth, self.steps)
        for s in range(step + 1, last + 1):
            if not self.prefetcher.pending(s):
                prompts = self.source.batch(s)
                job = functools.partial(self.request, prompts.ids, s, version)
                self.prefetcher.submit(s, prompts, job)

    def close(self) -> None:
        self.prefetcher.close()
