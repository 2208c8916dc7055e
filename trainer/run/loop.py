"""The RL loop: rollouts with routes -> old pass -> off-policy mini-steps -> predictor -> push.

Per rollout batch (see ``docs/method.md``):

1. request ``prompts_per_batch x samples_per_prompt`` rollouts with routes, spread over the
   servers; drop the groups with a sample older than ``max_staleness`` versions or with routes
   that cannot be replayed (both counted); rewards of the run's reward functions
   (:mod:`trainer.data.source`: prompts and rewards); GRPO advantages;
2. train on the batch (:mod:`trainer.algo.train_step`: old pass, mini-steps, predictor steps);
3. push policy (+ predictor for pr2) to every server as version + 1.

:class:`Trainer` runs this in one process, or as rank 0 of a ``torchrun`` job
(:mod:`trainer.run.distributed` hands it a learner whose training and export are collectives).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pr2_serve.client.payload import weights_payload
from pr2_serve.client.retry import Retrying, RetryPolicy
from pr2_serve.core.route_protocol import route_rows, validate_routes
from trainer.algo.batch import make_batch
from trainer.algo.train_step import Learner
from trainer.checkpoint import checkpoints
from trainer.data.source import Source
from trainer.rollouts import no_server
from trainer.rollouts import weight_agreement as sync
from trainer.rollouts.async_rollouts import AsyncRollouts, lag_metrics
from trainer.rollouts.collective_push import BACKENDS, CollectiveLink, check_backend
from trainer.rollouts.server_pool import NoServerLeft, ServerPool
from trainer.run.config import TrainConfig
from trainer.run.policy import Policy
from trainer.run.precision import precision_line
from trainer.run.progress import RunProgress


def make_client(address: str, api_key: str | None):
    from pr2_serve.client import GrpcClient, HttpClient

    if address.startswith("grpc://"):
        return GrpcClient(address.removeprefix("grpc://"), api_key=api_key)
    return HttpClient(address, api_key=api_key)


def make_pool(clients, cfg: TrainConfig, version: int, out: Path, log) -> ServerPool:
    """The run's servers, retrying for ``cfg.server_timeout`` s; the last pushed file is kept
    in ``out/.servers`` for re-syncs."""
    policy = RetryPolicy(budget_s=cfg.server_timeout)
    return ServerPool(
        clients, cfg.servers, version, policy=policy, keep_dir=out / ".servers", log=log
    )


def start_clients(clients, cfg: TrainConfig, log) -> list[Retrying]:
    """The clients as the start-up uses them: ``info`` and pushes retried for
    ``cfg.server_timeout`` s."""
    policy = RetryPolicy(budget_s=cfg.server_timeout)
    return [Retrying(c, a, policy, log=log) for c, a in zip(clients, cfg.servers, strict=True)]


# -- what a rollout must be to be trained on -------------------------------------------------------
@dataclass(frozen=True)
class RouteShape:
    """What every sample's routes must be: ``[route_rows(P, O), num_layers, top_k]``, ids below
    ``num_experts``, no expert twice in a row
    (:func:`pr2_serve.core.route_protocol.validate_routes`)."""

    num_layers: int
    top_k: int
    num_experts: int


def route_problem(sample, shape: RouteShape) -> str | None:
    """Why ``sample``'s routes cannot be trained on, or None.

    Routes are needed in every mode: r3/pr2 replay them, and the batch tensors, the routing
    deviation of ``none`` and the server-route agreement read them. A wrong row count, an id
    out of range or a repeated id (a hole filled with zeros) would otherwise be replayed (or
    measured) silently."""
    if sample.routes is None:
        return "no routes"
    rows = route_rows(len(sample.prompt_token_ids), len(sample.output_token_ids))
    try:
        validate_routes(sample.routes, shape.num_layers, shape.top_k, shape.num_experts, rows)
    except ValueError as e:
        return str(e)
    return None


@dataclass
class Rollouts:
    """The groups kept from one rollout request (prompt-major, ``group_size`` per prompt)."""

    samples: list
    rewards: torch.Tensor
    examples: list  # trainer.data.prompt_data.Example of each kept group
    reward_means: dict = field(default_factory=dict)  # reward function -> its mean
    dropped_stale: int = 0  # samples (whole groups) generated too many versions ago
    dropped_bad_routes: int = 0  # samples (whole groups) with routes that cannot be trained on


def screen_groups(
    groups: Sequence[list],
    examples: Sequence,
    version: int,
    max_staleness: int,
    shape: RouteShape,
    score: Callable[[list, list[list]], tuple[list[float], dict]],
    log: Callable[[str], None] = print,
) -> Rollouts:
    """Keep the groups whose samples are all fresh enough and have valid routes; score them
    (``score(examples, groups)``: :meth:`trainer.data.source.Source.score`, one call per batch).

    A bad sample drops its whole GRPO group: advantages are normalised within the group, so the
    other samples' advantages would be wrong without it."""
    samples, kept, kept_groups = [], [], []
    out = Rollouts(samples, torch.tensor([]), kept)
    for i, (group, example) in enumerate(zip(groups, examples, strict=True)):
        if any(version - s.weight_version > max_staleness for s in group):
            out.dropped_stale += len(group)
            continue
        bad = [(s, why) for s in group if (why := route_problem(s, shape)) is not None]
        if bad:
            s, why = bad[0]
            log(
                f"dropped the group of prompt {i} ({len(group)} samples): "
                f"sample {s.sample_index}: bad routes: {why}"
            )
            out.dropped_bad_routes += len(group)
            continue
        samples += group
        kept.append(example)
        kept_groups.append(group)
    rewards, out.reward_means = score(kept, kept_groups)
    out.rewards = torch.tensor(rewards, dtype=torch.float32)
    return out


# -- the loop --------------------------------------------------------------------------------------
class Trainer:
    """Drives ``cfg.steps`` rollout batches against the servers (rank 0 of a job, or alone).

    ``learner``: how batches are trained and what is exported (default: one process on a
    fresh :class:`Policy` of ``cfg.model_dir``)."""

    def __init__(self, cfg: TrainConfig, log=print, learner: Learner | None = None) -> None:
        self.cfg = cfg
        self.log = log
        check_backend(cfg.weight_transfer)  # (nccl: refused at once without CUDA)
        # everything local first (every row loaded, checked and encoded; every reward function
        # imported and called once): a mistake of the user's costs no server wait and no push
        self.source = Source.local(cfg)
        self.clients = [make_client(a, cfg.api_key) for a in cfg.servers]
        calls = start_clients(self.clients, cfg, log)  # (a server may be coming up)
        infos = [c.info() for c in calls]  # model facts: asked once (versions may change below)
        self.source.fit(infos)  # prompts within the servers' max_model_len
        fingerprints = None  # what every server serves at self.version (pool re-syncs check it)
        if cfg.resume:  # the checkpoint's weights are re-synced in run() (checkpoints.py)
            version = max(c.info()["weight_version"] for c in calls)
        else:  # every server serves the starting weights (predictor as the mode serves it)
            target = sync.starting_target(cfg.model_dir, cfg.replay)
            version = sync.agree(calls, cfg.servers, target, cfg.on_mismatch, log)
            fingerprints = target.fingerprints
        self.progress = RunProgress(version=version)  # what a checkpoint saves
        self.learner = learner or Learner(Policy.from_config(cfg), cfg)
        self.policy = self.learner.policy
        served = [i.get("dtype") for i in infos]  # absent: "unknown"
        self.log(precision_line(cfg.dtype, self.policy.device, served))
        replay = self.policy.replay
        self.route_shape = RouteShape(replay.num_moe_layers, replay.top_k, replay.num_experts)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.servers = make_pool(self.clients, cfg, self.version, self.out, log)
        self.servers.fingerprints = fingerprints
        # --max-staleness: requests made ahead
        self.async_rollouts = AsyncRollouts(cfg, self.learner, self.source, self.request_rollouts)
        self.request_seconds: float | None = None  # the last step's background request
        # --weight-transfer gloo|nccl: one transfer group to the servers, opened at first push
        self.collective = None
        if cfg.weight_transfer in BACKENDS:
            self.collective = CollectiveLink(cfg.weight_transfer_address, cfg.weight_transfer)

    @property
    def version(self) -> int:
        """The weight version every live server serves."""
        return self.progress.version

    @version.setter
    def version(self, version: int) -> None:
        self.progress.version = version

    # rollouts ------------------------------------------------------------------------------------
    def request_rollouts(
        self, prompts: list[list[int]], step: int, min_version: int | None = None
    ) -> list[list]:
        """Every prompt's samples (a group, in sample order), spread over the servers, of weight
        version ``min_version`` or newer (default: the current one)."""
        cfg = self.cfg
        return self.servers.generate(
            prompts,
            seed=cfg.seed * 7919 + step * 31,
            n=cfg.samples_per_prompt,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            min_weight_version=self.version if min_version is None else min_version,
            stop_token_ids=self.source.stop_token_ids,
        )

    def rollout(self, step: int) -> Rollouts:
        cfg = self.cfg
        self.servers.take_back()  # (between steps, in this thread)
        prompts, groups, self.request_seconds = self.async_rollouts.take(step, self.version)
        got = screen_groups(
            groups,
            prompts.examples,
            self.version,
            cfg.max_staleness,
            self.route_shape,
            self.source.score,
            log=lambda line: self.log(f"step {step}: {line}"),
        )
        self.progress.dropped_stale += got.dropped_stale
        self.progress.dropped_bad_routes += got.dropped_bad_routes
        return got

    def push(self, state_dict: dict | None = None) -> float:
        """Export (``state_dict``: the gathered weights of a sharded model) and push to every
        server as the next version: streamed from memory, hashed once, the same body to each."""
        t0 = time.perf_counter()
        served = self.learner.served_predictors()  # alpha x (W_p, look-ahead or ridge)
        tensors = self.policy.checkpoint_tensors(
            self.cfg.replay.serves_predictor, state_dict, served
        )
        tensors = self.async_rollouts.own(tensors)  # (copies when rollouts run ahead)
        version = self.version + 1
        if self.collective is not None:  # one collective to every server
            # (on failure the pool pushes over HTTP/gRPC: its retries, drops, checkpoint)
            send = self.collective.sender(tensors)
            results = self.servers.push(tensors, version, collective=send)
        else:
            results = self.servers.push(weights_payload(tensors), version)
        if {r["weight_version"] for r in results} != {version}:
            raise RuntimeError(f"servers did not all commit version {version}: {results}")
        self.async_rollouts.pushed(version, tensors)
        self.version = version
        return time.perf_counter() - t0

    def evaluate(self) -> float | None:
        """Mean reward of greedy completions of the held-out prompts (the accuracy, for a 0/1
        reward); None without an eval split."""
        prompts = self.source.eval_batch()
        if not prompts.ids:
            return None
        res = self.servers.generate_one(
            prompts.ids,
            temperature=0.0,
            max_tokens=self.cfg.max_tokens,
            stop_token_ids=self.source.stop_token_ids,
        )
        samples = sorted(res.samples, key=lambda s: s.prompt_index)
        rewards, _ = self.source.score(prompts.examples, [[s] for s in samples])
        return float(np.mean(rewards))

    def step(self, step: int) -> dict:
        """One rollout batch: rollout, train (``self.learner``), push, maybe evaluate."""
        cfg = self.cfg
        t0 = time.perf_counter()
        got = self.rollout(step)
        samples, rewards = got.samples, got.rewards
        m: dict = {
            "step": step,
            "weight_version": self.version,
            "rollout_versions": sorted({s.weight_version for s in samples}),
            **lag_metrics(samples, self.version),
            "time_rollout": time.perf_counter() - t0,
            "time_rollout_request": self.request_seconds,  # (in the background: overlapped)
        }
        m["reward_mean"] = float(rewards.mean()) if len(rewards) else None
        m["reward_std"] = float(rewards.std(unbiased=False)) if len(rewards) else None
        m.update({f"reward/{name}": v for name, v in got.reward_means.items()})
        m["dropped_stale"] = self.progress.dropped_stale
        m["dropped_bad_routes"] = self.progress.dropped_bad_routes
        m.update(self.servers.metrics())  # live_servers, resent_requests, outage_seconds
        batch = None
        if samples:
            shape = self.route_shape
            batch = make_batch(
                samples,
                rewards,
                cfg.samples_per_prompt,
                shape.num_layers,
                shape.top_k,
                self.version,
            )
        predictors = self.async_rollouts.predictors.by_staleness(self.version)
        m.update(self.learner.train(batch, predictors))  # (a collective under torchrun too)
        self.progress.trained = m
        m["time_push"] = self.push(self.learner.state_dict())
        m["pushed_version"] = self.version
        if cfg.eval_every and step % cfg.eval_every == 0:
            m["eval_accuracy"] = self.evaluate()
        return m

    def close(self) -> None:
        """Close everything the trainer opened: the request threads, the server pool, the
        transfer group and the clients (no thread outlives the trainer)."""
        self.async_rollouts.close()  # (first: its request runs on the server pool's threads)
        self.servers.close()
        if self.collective is not None:
            self.collective.close()
        for c in self.clients:
            c.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, on_step=None) -> list[dict]:
        """The steps (from the newest checkpoint on with ``cfg.resume``), checkpoints every
        ``cfg.save_every`` steps; the run's metrics rows (those kept from before a resume too).
        With no server left, a checkpoint to resume from (:mod:`trainer.rollouts.no_server`),
        named in the :class:`NoServerLeft` raised."""
        cfg, progress = self.cfg, self.progress
        checkpoints.check_supported(cfg, distributed=self.learner.shard[1] > 1)
        if cfg.resume:
            start, history = checkpoints.resume(self.learner, cfg, progress, self.servers, self.log)
        else:
            start, history = 1, []
        self.async_rollouts.start(self.version)
        try:
            self._steps(start, history, on_step)
        except NoServerLeft as e:
            said = no_server.checkpoint_on_no_server(self.learner, cfg, progress, str(e), self.log)
            raise NoServerLeft(f"{e}; {said}") from e
        return history

    def _steps(self, start: int, history: list[dict], on_step) -> None:
        cfg = self.cfg
        with open(self.out / "metrics.jsonl", "a") as f:
            for step in range(start, cfg.steps + 1):
                m = self.step(step)
                f.write(json.dumps(m) + "\n")
                f.flush()
                self.progress.last_step = step
                if checkpoints.save_due(step, cfg.save_every, cfg.steps):
                    checkpoints.save_checkpoint(self.learner, cfg, self.progress, step)
                history.append(m)
                if on_step:
                    on_step(m)
