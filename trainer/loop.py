"""The RL loop: rollouts with routes -> old pass -> off-policy mini-steps -> predictor -> push.

Per rollout batch (see ``shared/notes/pr2-method.md``):

1. request ``prompts_per_batch x samples_per_prompt`` rollouts with routes, spread over the
   servers; drop samples older than ``max_staleness`` versions; exact-match rewards;
   GRPO advantages;
2. old-logprob pass at theta_old (no grad): replaying the server's routes (r3, pr2), recording
   its own routes (r2), natural routing (none); keep router inputs/logits (``h_old``, ``z_old``);
3. ``off_policy_steps`` mini-steps of the clipped objective, each on a slice of the groups,
   replaying per mode; from mini-step 2 on, a predictor step (pr2) towards the moved router;
4. push policy (+ predictor for pr2) to every server as version + 1.

:func:`train_batch` (steps 2-3) is a pure function of the batch and the model, so data-parallel
training (``torchrun``) is the same code on a slice of the batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from pr2_serve.routing import deviation_counts, deviation_histogram

from .config import TrainConfig
from .ppo import grpo_advantages, ppo_loss, token_logprobs
from .predictor import (
    drift_cosine,
    predicted_route_agreement,
    predictor_hit_rate,
    predictor_loss,
)
from .replay import MoEReplay, RoutingControl
from .tasks import Task, encode, exact_match


# -- batch -----------------------------------------------------------------------------------------
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
    group_size: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name (all but ``group_size``), in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "group_size"}

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self.tensors().values()), self.group_size)

    def select(self, idx: torch.Tensor) -> Batch:
        return Batch(*(t[idx] for t in self.tensors().values()), self.group_size)


def make_batch(
    samples, rewards: torch.Tensor, group_size: int, num_layers: int, top_k: int
) -> Batch:
    """Tensors from server samples (ordered prompt-major, ``group_size`` per prompt)."""
    lengths = [len(s.prompt_token_ids) + len(s.output_token_ids) - 1 for s in samples]
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
        group_size,
    )


# -- policy ----------------------------------------------------------------------------------------
class Policy:
    """The HF model of the served checkpoint, with routing control and predictors."""

    def __init__(self, model_dir: str, seed: int = 0, device: str = "cpu") -> None:
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
        self.model.to(device)
        self.replay = MoEReplay(self.model)
        tensors = {}
        for f in Path(model_dir).glob("*.safetensors"):
            tensors.update(load_file(str(f)))
        self.replay.load_predictors(tensors)
        self.device = device
        self.last_router_delta: list[torch.Tensor] | None = None  # the previous batch's update

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        pred = {id(p) for m in self.replay.predictors for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in pred]

    def predictor_parameters(self) -> list[torch.nn.Parameter]:
        return [m.weight for m in self.replay.predictors]

    def router_weights(self) -> list[torch.Tensor]:
        """Each MoE router's weight as a whole tensor (gathered when FSDP2 shards it: a
        collective, so every rank calls this at the same point)."""
        return [full_tensor(r.weight) for r in self.replay.routers]

    def export(self, out_dir: Path, with_predictor: bool, state_dict: dict | None = None) -> Path:
        """The weights as a checkpoint-format safetensors file (HF's own save conversion).

        ``state_dict``: the full (gathered) state dict when the model is sharded."""
        self.model.save_pretrained(
            out_dir, state_dict=state_dict, safe_serialization=True, max_shard_size="1000GB"
        )
        path = out_dir / "model.safetensors"
        from safetensors.torch import load_file, save_file

        t = load_file(str(path))
        # the predictor's name is `mlp.predictor` in every family (HF renames Mixtral's `mlp`)
        t = {
            k.replace(".block_sparse_moe.predictor.", ".mlp.predictor."): v
            for k, v in t.items()
            if with_predictor or ".predictor." not in k
        }
        save_file(t, str(path), metadata={"format": "pt"})
        return path


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor when ``t`` is a (sharded) DTensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def forward_logprobs(
    policy: Policy, batch: Batch, ctl: RoutingControl, model: torch.nn.Module | None = None
) -> torch.Tensor:
    """Per-position log-probs of ``batch.targets`` under ``ctl``'s routing, ``[B, T]``."""
    with policy.replay.control(ctl):
        logits = (model or policy.model)(input_ids=batch.input_ids.to(policy.device)).logits
    return token_logprobs(logits, batch.targets.to(policy.device))


def flat_routes(routes: torch.Tensor) -> torch.Tensor:
    b, t, layers, k = routes.shape
    return routes.reshape(b * t, layers, k)


# -- one batch -------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    metrics: dict = field(default_factory=dict)


def train_batch(
    policy: Policy,
    batch: Batch,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    pred_opt: torch.optim.Optimizer | None,
    model: torch.nn.Module | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Old pass + ``cfg.off_policy_steps`` mini-steps (+ predictor steps for pr2).

    Data parallel: every rank holds the whole batch; ``shard = (rank, world)`` makes each rank
    compute the gradient of its share of each mini-step's groups, scaled so that DDP's gradient
    average equals the single-process gradient of the mini-step's token mean. ``model`` is the
    module forwards go through (the DDP wrapper). The old pass and the predictor loss are
    computed on the whole batch on every rank (identical results, no communication).
    """
    rank, world = shard
    mode, k = cfg.replay, policy.replay.top_k
    batch = batch.to(policy.device)
    m: dict = {}
    t0 = time.perf_counter()
    # -- old-logprob pass at theta_old --------------------------------------------------------
    # Run in the same pieces (mini-step x rank shard) as the training forwards below: equal
    # shapes give bit-identical kernels, so mini-step 1's ratio is exactly 1 when replaying.
    server_routes = flat_routes(batch.routes)
    b, t = batch.input_ids.shape
    groups = b // batch.group_size
    order = torch.arange(groups).chunk(cfg.off_policy_steps)

    def sample_rows(gidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gidx = gidx.to(policy.device)
        arange_g = torch.arange(batch.group_size, device=policy.device)
        idx = (gidx[:, None] * batch.group_size + arange_g).reshape(-1)
        return idx, (idx[:, None] * t + torch.arange(t, device=policy.device)).reshape(-1)

    old_lp = torch.zeros(b, t, device=policy.device)
    h_old = z_old = None
    old_routes = torch.zeros_like(server_routes) if mode == "r2" else None
    with torch.no_grad():
        for gidx in order:
            for r in range(world):
                idx, rows = sample_rows(gidx[r::world])
                if len(idx) == 0:
                    continue
                forced = server_routes[rows] if mode in ("r3", "pr2") else None
                ctl = RoutingControl(forced_ids=forced, record=True)
                old_lp[idx] = forward_logprobs(policy, batch.select(idx), ctl)
                if h_old is None:
                    h_old = [h.new_zeros(b * t, h.shape[-1]) for h in ctl.hidden]
                    z_old = [z.new_zeros(b * t, z.shape[-1]) for z in ctl.logits]
                for layer in range(len(ctl.hidden)):
                    h_old[layer][rows] = ctl.hidden[layer]
                    z_old[layer][rows] = ctl.logits[layer]
                if old_routes is not None:
                    old_routes[rows] = ctl.recorded_routes()
    lm = batch.loss_mask
    diff = (old_lp - batch.server_logprobs) * lm
    n_tok = lm.sum().clamp(min=1)
    m["train_infer_abs_dlogp"] = float(diff.abs().sum() / n_tok)
    log_r = old_lp - batch.server_logprobs  # trainer / server, on server samples
    m["train_infer_kl"] = float((((log_r.exp() - 1) - log_r) * lm).sum() / n_tok)
    m["time_old_pass"] = time.perf_counter() - t0
    # -- mini-steps -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    routers_before = [w.detach().clone() for w in policy.router_weights()]
    predictor_at_rollout = [w.detach().clone() for w in policy.predictor_parameters()]
    hist = torch.zeros(k + 1, dtype=torch.long, device=policy.device)
    hist_off = torch.zeros(k + 1, dtype=torch.long, device=policy.device)
    stats, grad_norms, pred_losses = [], [], []
    valid_flat = batch.valid.reshape(-1).bool()
    reference = old_routes if mode == "r2" else server_routes
    for step, gidx in enumerate(order, start=1):
        all_idx, _ = sample_rows(gidx)
        normalizer = batch.loss_mask[all_idx].sum().clamp(min=1) / world  # the mini-step's
        idx, rows = sample_rows(gidx[rank::world])
        mb = batch.select(idx)
        forced = None
        if mode in ("r3", "pr2"):
            forced = server_routes[rows]
        elif mode == "r2":
            forced = old_routes[rows]
        ctl = RoutingControl(forced_ids=forced, record=True)
        lp = forward_logprobs(policy, mb, ctl, model)
        if step == 1:  # at theta_old with the same routes the ratio must be exactly 1
            dev1 = (lp.detach() - old_lp[idx]).abs() * mb.loss_mask
            m["first_ratio_max_dev"] = float(dev1.max())
        loss, st = ppo_loss(
            lp, old_lp[idx], mb.advantages.to(lp.device), mb.loss_mask, cfg.clip_eps, normalizer
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = policy.policy_parameters()
        # (max_norm inf: only measures; DTensor grads under FSDP2 give a DTensor norm)
        gn = torch.nn.utils.clip_grad_norm_(
            [p for p in params if p.grad is not None],
            cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
        )
        opt.step()
        stats.append(st)
        grad_norms.append(float(full_tensor(gn)))
        # routing deviation: the route used (replayed, or the rollout's for `none`) vs the
        # router's fresh top-k in this forward, over real positions
        with torch.no_grad():
            used = reference[rows][valid_flat[rows]]
            for layer, z in enumerate(ctl.logits):
                dev = deviation_counts(used[:, layer], z.detach()[valid_flat[rows]])
                h = deviation_histogram(dev, k)
                hist += h
                if step > 1:
                    hist_off += h
        # predictor: from mini-step 2 on, towards where the router has moved
        if mode == "pr2" and pred_opt is not None and step > 1:
            pl = predictor_loss(
                cfg.predictor_loss,
                h_old,
                z_old,
                policy.router_weights(),
                policy.predictor_parameters(),
                batch.valid.reshape(-1),
            )
            pred_opt.zero_grad(set_to_none=True)
            pl.backward()
            pred_opt.step()
            pred_losses.append(float(pl))
    m["time_train"] = time.perf_counter() - t0
    # -- metrics ----------------------------------------------------------------------------------
    m["loss"] = float(np.mean([s.loss for s in stats]))  # this rank's share when sharded
    m["clip_fraction"] = float(np.mean([s.clip_fraction for s in stats]))
    m["approx_kl"] = float(np.mean([s.approx_kl for s in stats]))
    m["first_ratio_mean"] = stats[0].ratio_mean
    m["grad_norm"] = float(np.mean(grad_norms))
    m["deviation_hist"] = hist.tolist()
    m["zero_deviation"] = float(hist[0] / hist.sum().clamp(min=1))
    m["zero_deviation_offpolicy"] = float(hist_off[0] / hist_off.sum()) if hist_off.sum() else None
    routers = policy.router_weights()
    valid = batch.valid.reshape(-1)
    m["predictor_hit_rate"] = predictor_hit_rate(
        h_old, z_old, routers, policy.predictor_parameters(), k, valid
    )
    m["zero_predictor_hit_rate"] = predictor_hit_rate(h_old, z_old, routers, None, k, valid)
    # the server's routes vs the trainer's own top-k(z_old + W_p h_old) with the pushed predictor
    m["server_route_agreement"] = predicted_route_agreement(
        server_routes, h_old, z_old, predictor_at_rollout or None, valid
    )
    # out of sample: the predictor the server used for this rollout (trained on earlier batches)
    m["rollout_predictor_hit_rate"] = predictor_hit_rate(
        h_old, z_old, routers, predictor_at_rollout, k, valid
    )
    delta = [w.detach() - w0 for w, w0 in zip(routers, routers_before, strict=True)]
    m["router_drift_rel"] = float(
        torch.cat([d.reshape(-1) for d in delta]).norm()
        / torch.cat([w.detach().reshape(-1) for w in routers_before]).norm().clamp(min=1e-12)
    )
    m["router_drift_cos_prev"] = drift_cosine(policy.last_router_delta, delta)
    policy.last_router_delta = delta
    m["predictor_loss"] = float(np.mean(pred_losses)) if pred_losses else None
    return m


def make_policy_optimizer(policy: Policy, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the policy; router weights at ``lr x router_lr_multiplier``."""
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


# -- the loop --------------------------------------------------------------------------------------
def make_client(address: str, api_key: str | None):
    from pr2_serve.client import GrpcClient, HttpClient

    if address.startswith("grpc://"):
        return GrpcClient(address.removeprefix("grpc://"), api_key=api_key)
    return HttpClient(address, api_key=api_key)


class Trainer:
    """Drives ``cfg.steps`` rollout batches against the servers (rank 0 of a job, or alone)."""

    def __init__(self, cfg: TrainConfig, log=print) -> None:
        self.cfg = cfg
        self.log = log
        self.task = Task(cfg.task, cfg.task_digits)
        self.clients = [make_client(a, cfg.api_key) for a in cfg.servers]
        versions = {c.info()["weight_version"] for c in self.clients}
        if len(versions) != 1:
            raise RuntimeError(f"servers disagree on the weight version: {versions}")
        self.version = versions.pop()
        self.policy = Policy(cfg.model_dir, seed=cfg.seed)
        self.opt = make_policy_optimizer(self.policy, cfg)
        self.pred_opt = (
            torch.optim.Adam(
                self.policy.predictor_parameters(), lr=cfg.lr * cfg.predictor_lr_multiplier
            )
            if cfg.replay == "pr2"
            else None
        )
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.pool = cf.ThreadPoolExecutor(max_workers=max(2, len(self.clients)))
        self.dropped_stale = 0

    # rollouts ------------------------------------------------------------------------------------
    def rollout(self, step: int):
        cfg = self.cfg
        problems = self.task.batch(cfg.prompts_per_batch, seed=cfg.seed * 100003 + step)
        prompts = [encode(p.prompt) for p in problems]
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
        samples, rewards, kept_problems = [], [], []
        for i in range(len(prompts)):
            group = sorted(by_prompt[i], key=lambda s: s.sample_index)
            if any(self.version - s.weight_version > cfg.max_staleness for s in group):
                self.dropped_stale += len(group)
                continue
            samples += group
            rewards += [exact_match(s.output_token_ids, problems[i].answer) for s in group]
            kept_problems.append(problems[i])
        return samples, torch.tensor(rewards), kept_problems

    def push(self, state_dict: dict | None = None) -> float:
        """Export (``state_dict``: the gathered weights of a sharded model) and push to every
        server as the next version."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            path = self.policy.export(
                Path(tmp), with_predictor=self.cfg.replay == "pr2", state_dict=state_dict
            )
            version = self.version + 1
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
        cfg = self.cfg
        t0 = time.perf_counter()
        samples, rewards, _ = self.rollout(step)
        m: dict = {
            "step": step,
            "weight_version": self.version,
            "rollout_versions": sorted({s.weight_version for s in samples}),
            "time_rollout": time.perf_counter() - t0,
        }
        m["reward_mean"] = float(rewards.mean()) if len(rewards) else None
        m["reward_std"] = float(rewards.std(unbiased=False)) if len(rewards) else None
        m["dropped_stale"] = self.dropped_stale
        if samples:
            info = self.policy.replay
            batch = make_batch(
                samples, rewards, cfg.samples_per_prompt, info.num_moe_layers, info.top_k
            )
            m.update(train_batch(self.policy, batch, cfg, self.opt, self.pred_opt))
        m["time_push"] = self.push()
        m["pushed_version"] = self.version
        if cfg.eval_every and step % cfg.eval_every == 0:
            m["eval_accuracy"] = self.evaluate()
        return m

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
