"""The RL loop: rollouts with routes -> old pass -> off-policy mini-steps -> predictor -> push.

Per rollout batch (see ``shared/notes/pr2-method.md``):

1. request ``prompts_per_batch x samples_per_prompt`` rollouts with routes, spread over the
   servers; drop the groups with a sample older than ``max_staleness`` versions or with routes
   that cannot be replayed (both counted); exact-match rewards; GRPO advantages;
2. train on the batch (:mod:`trainer.train_step`: old pass, mini-steps, predictor steps);
3. push policy (+ predictor for pr2) to every server as version + 1.

:class:`Trainer` runs this in one process, or as rank 0 of a ``torchrun`` job
(:mod:`trainer.distributed` hands it a learner whose training and export are collectives).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pr2_serve.routes import route_rows, validate_routes

from .batch import make_batch
from .config import TrainConfig
from .policy import Policy
from .tasks import Problem, Task, encode, exact_match
from .train_step import Learner
from .transfer import collective_push


def make_client(address: str, api_key: str | None):
    from pr2_serve.client import GrpcClient, HttpClient

    if address.startswith("grpc://"):
        return GrpcClient(address.removeprefix("grpc://"), api_key=api_key)
    return HttpClient(address, api_key=api_key)


# -- what a rollout must be to be trained on -------------------------------------------------------
@dataclass(frozen=True)
class RouteShape:
    """What every sample's routes must be: ``[route_rows(P, O), num_layers, top_k]``, ids below
    ``num_experts``, no expert twice in a row (:func:`pr2_serve.routes.validate_routes`)."""

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
    problems: list[Problem]
    dropped_stale: int = 0  # samples (whole groups) generated too many versions ago
    dropped_bad_routes: int = 0  # samples (whole groups) with routes that cannot be trained on


def screen_groups(
    groups: Sequence[list],
    problems: Sequence[Problem],
    version: int,
    max_staleness: int,
    shape: RouteShape,
    log: Callable[[str], None] = print,
) -> Rollouts:
    """Keep the groups whose samples are all fresh enough and have valid routes; score them.

    A bad sample drops its whole GRPO group: advantages are normalised within the group, so the
    other samples' advantages would be wrong without it."""
    samples, rewards, kept = [], [], []
    out = Rollouts(samples, torch.tensor([]), kept)
    for i, (group, problem) in enumerate(zip(groups, problems, strict=True)):
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
        rewards += [exact_match(s.output_token_ids, problem.answer) for s in group]
        kept.append(problem)
    out.rewards = torch.tensor(rewards)
    return out


# -- the loop --------------------------------------------------------------------------------------
class Trainer:
    """Drives ``cfg.steps`` rollout batches against the servers (rank 0 of a job, or alone).

    ``learner``: how batches are trained and what is exported (default: one process on a
    fresh :class:`Policy` of ``cfg.model_dir``)."""

    def __init__(self, cfg: TrainConfig, log=print, learner: Learner | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.task = Task(cfg.task, cfg.task_digits)
        self.clients = [make_client(a, cfg.api_key) for a in cfg.servers]
        versions = {c.info()["weight_version"] for c in self.clients}
        if len(versions) != 1:
            raise RuntimeError(f"servers disagree on the weight version: {versions}")
        self.version = versions.pop()
        self.learner = learner or Learner(Policy(cfg.model_dir, seed=cfg.seed), cfg)
        self.policy = self.learner.policy
        replay = self.policy.replay
        self.route_shape = RouteShape(replay.num_moe_layers, replay.top_k, replay.num_experts)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.pool = cf.ThreadPoolExecutor(max_workers=max(2, len(self.clients)))
        self.dropped_stale = 0
        self.dropped_bad_routes = 0

    # rollouts ------------------------------------------------------------------------------------
    def request_rollouts(self, prompts: list[list[int]], step: int) -> list[list]:
        """Every prompt's samples (a group, in sample order), spread over the servers."""
        cfg = self.cfg
        parts = [list(range(i, len(prompts), len(self.clients))) for i in range(len(self.clients))]
        futures = [
            self.pool.submit(
                c.generate,
                [prompts[i] for i in part],
                n=cfg.samples_per_prompt,
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
                seed=cfg.seed * 7919 + step * 31 + j,
                min_weight_version=self.version,
            )
            for j, (c, part) in enumerate(zip(self.clients, parts, strict=True))
            if part
        ]
        by_prompt: dict[int, list] = {}
        for part, fut in zip([p for p in parts if p], futures, strict=True):
            for s in fut.result().samples:
                by_prompt.setdefault(part[s.prompt_index], []).append(s)
        return [sorted(by_prompt[i], key=lambda s: s.sample_index) for i in range(len(prompts))]

    def rollout(self, step: int) -> Rollouts:
        cfg = self.cfg
        problems = self.task.batch(cfg.prompts_per_batch, seed=cfg.seed * 100003 + step)
        groups = self.request_rollouts([encode(p.prompt) for p in problems], step)
        got = screen_groups(
            groups,
            problems,
            self.version,
            cfg.max_staleness,
            self.route_shape,
            log=lambda line: self.log(f"step {step}: {line}"),
        )
        self.dropped_stale += got.dropped_stale
        self.dropped_bad_routes += got.dropped_bad_routes
        return got

    def push(self, state_dict: dict | None = None) -> float:
        """Export (``state_dict``: the gathered weights of a sharded model) and push to every
        server as the next version."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            path = self.policy.export(
                Path(tmp), with_predictor=self.cfg.replay == "pr2", state_dict=state_dict
            )
            version = self.version + 1
            if self.cfg.weight_transfer == "gloo":  # one collective to every server
                results = collective_push(self, path, version)
            else:
                results = list(
                    self.pool.map(lambda c: c.push_weights(str(path), version), self.clients)
                )
        if {r["weight_version"] for r in results} != {version}:
            raise RuntimeError(f"servers did not all commit version {version}: {results}")
        self.version = version
        return time.perf_counter() - t0

    def evaluate(self) -> float:
        cfg = self.cfg
        problems = self.task.batch(cfg.eval_size, seed=cfg.seed, split="eval")
        res = self.clients[0].generate(
            [encode(p.prompt) for p in problems], temperature=0.0, max_tokens=cfg.max_tokens
        )
        return float(
            np.mean(
                [
                    exact_match(s.output_token_ids, p.answer)
                    for s, p in zip(res.samples, problems, strict=True)
                ]
            )
        )

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
            "time_rollout": time.perf_counter() - t0,
        }
        m["reward_mean"] = float(rewards.mean()) if len(rewards) else None
        m["reward_std"] = float(rewards.std(unbiased=False)) if len(rewards) else None
        m["dropped_stale"] = self.dropped_stale
        m["dropped_bad_routes"] = self.dropped_bad_routes
        batch = None
        if samples:
            shape = self.route_shape
            batch = make_batch(
                samples, rewards, cfg.samples_per_prompt, shape.num_layers, shape.top_k
            )
        m.update(self.learner.train(batch))  # (a collective under torchrun: also without batch)
        m["time_push"] = self.push(self.learner.state_dict())
        m["pushed_version"] = self.version
        if cfg.eval_every and step % cfg.eval_every == 0:
            m["eval_accuracy"] = self.evaluate()
        return m

    def close(self) -> None:
        """Stop the request threads and close the clients (no thread outlives the trainer)."""
        self.pool.shutdown()
        for c in self.clients:
            c.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, on_step=None) -> list[dict]:
        history = []
        with open(self.out / "metrics.jsonl", "a") as f:
            for step in range(1, self.cfg.steps + 1):
                m = self.step(step)
                f.write(json.dumps(m) + "\n")
                f.flush()
                history.append(m)
                if on_step:
                    on_step(m)
        return history
