"""Trainer configuration: one dataclass, a docstring per field; from a YAML/TOML file and flags.

``pr2-train --config run.yaml --replay pr2 --off-policy-steps 4`` -- flags override the file,
the file overrides the defaults. Every field's docstring is its ``--help`` text.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import os
import textwrap
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from trainer.algo.replay_mode import ReplayMode

PredictorLoss = Literal["kl-post", "l2"]
Parallel = Literal["ddp", "fsdp2"]
TrainDtype = Literal["float32", "bfloat16"]  # precision and device (trainer.run.precision)
TrainDevice = Literal["auto", "cpu", "cuda"]
ExpertsImplementation = Literal["grouped_mm", "eager"]  # transformers' names (trainer.algo.replay)
OnMismatch = Literal["push", "fail"]
WeightTransfer = Literal["http", "grpc", "gloo", "nccl"]  # how weights reach the servers
PredictorKind = Literal["learned", "lookahead", "ridge"]  # the served predictor

#: The routing replay modes, in the order tables and plots list them.
REPLAY_MODES: tuple[str, ...] = tuple(m.value for m in ReplayMode)


@dataclass
class TrainConfig:
    servers: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000"])
    """Rollout servers: ``http://host:port`` or ``grpc://host:port``; rollouts are spread
    over all of them and every weight push goes to each."""
    model_dir: str = "runs/demo/model"
    """The HF checkpoint the servers were started on (the trainer's policy starts from it)."""
    task: str = "addition"
    """Task family (``addition``, ``sort``, ``count``, or a comma-separated mix): the toy data
    when no ``dataset`` is given."""
    task_digits: int = 2
    """Task difficulty (operand digits)."""
    # -- data and rewards (datasets, chat template, reward functions) ----------------
    dataset: str | None = None
    """Prompt data: a JSONL, JSON or Parquet file in TRL's standard (``{"prompt": "..."}``) or
    conversational (``{"prompt": [{"role": "user", "content": "..."}]}``) format, every other
    column passed to the reward functions; or ``toy:<task>`` (default: ``toy:`` + ``task``)."""
    prompt_field: str = "prompt"
    """The dataset column holding the prompt."""
    eval_dataset: str | None = None
    """Held-out prompts for eval (a file like ``dataset``; default: ``eval_fraction`` of
    ``dataset``, or the toy task's eval split)."""
    eval_fraction: float = 0.0
    """Fraction of ``dataset``'s rows held out for eval (seeded; 0: none)."""
    reward: list[str] = field(default_factory=list)
    """Reward functions, repeatable: ``exact``, ``math`` (math-verify), ``format:REGEX``,
    ``toy`` or ``module:function`` with TRL's signature (default: ``toy`` for ``toy:`` data,
    else ``exact``)."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward function (default: all 1)."""
    replay: ReplayMode = ReplayMode.PR2
    """Routing in training forwards: ``none`` (plain GRPO), ``r2`` (trainer's old-pass
    routes), ``r3`` (server routes), ``pr2`` (server routes chosen with the predictor)."""
    off_policy_steps: int = 2
    """Mini-steps per rollout batch (1: on-policy; the paper's off-policy levels: 2, 4, 8)."""
    prompts_per_batch: int = 16
    """Prompts per rollout batch."""
    samples_per_prompt: int = 8
    """Samples per prompt (the GRPO group size)."""
    max_tokens: int = 8
    """Generated tokens per sample."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    lr: float = 1e-4
    """Policy learning rate (Adam)."""
    router_lr_multiplier: float = 1.0
    """Router weights' lr = ``lr`` x this (a lever to study larger router drift)."""
    clip_eps: float = 0.2
    """PPO clip range."""
    grad_clip: float = 1.0
    """Max global grad norm of the policy (0: off)."""
    predictor_loss: PredictorLoss = "kl-post"
    """Predictor objective: ``kl-post`` (paper) or ``l2``."""
    predictor_lr_ratio: float = 0.03
    """Learned predictor's lr = this x the ROUTER's lr (``lr x router_lr_multiplier``): what
    matters is how far Adam moves ``W_p`` per step against how far the router it forecasts
    moves (docs/results.md, the counterfactual table: above ~1 the offset is mostly the
    optimiser's own noise)."""
    predictor_weight_decay: float = 0.0
    """Learned predictor: decoupled weight decay (AdamW) pulling ``W_p`` towards 0 (= R3)."""
    predictor_lr_multiplier: float | None = None
    """Deprecated: predictor lr = ``lr`` x this; converted to ``predictor_lr_ratio`` (this /
    ``router_lr_multiplier``) with a warning."""
    ridge_strength: float = 10.0
    """``--predictor ridge``: the ridge penalty on ``W_p`` (per unit of the router inputs'
    mean square)."""
    ridge_memory: float = 0.5
    """``--predictor ridge``: weight of the earlier batches' drift in the fit (each batch
    multiplies the old sums by this; 0: the last batch only)."""
    max_staleness: int = 0
    """Asynchronous rollouts with bounded staleness: 0, the synchronous loop (rollout, train,
    push); K >= 1, the rollouts of the next K steps are requested while this one trains
    (server and trainer overlap), samples generated more than K weight versions ago are
    dropped (counted) and stale samples are trained with decoupled PPO."""
    steps: int = 20
    """Rollout batches (= weight pushes)."""
    eval_every: int = 5
    """Greedy eval accuracy on the held-out split every this many steps (0: never)."""
    eval_size: int = 64
    """Held-out problems per eval."""
    seed: int = 0
    """Seeds prompts, sampling and the trainer."""
    output_dir: str = "runs/train"
    """Where ``metrics.jsonl`` (and checkpoints) go."""
    api_key: str | None = None
    """Servers' API key (default: ``$PR2_API_KEY``)."""
    parallel: Parallel = "ddp"
    """Under ``torchrun``: ``ddp`` (the policy replicated on every rank) or ``fsdp2``
    (``fully_shard`` per decoder layer: parameters, gradients and optimizer state sharded
    across ranks; predictors stay replicated). Ignored in a single process."""
    # -- checkpoints and resume (trainer/checkpoint/checkpoints.py) --
    save_every: int = 0
    """Write a checkpoint (``output_dir/checkpoint-<step>``) every this many steps and after
    the last one (0: none)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints (0: all)."""
    resume: bool = False
    """Continue from the newest checkpoint in ``output_dir``: its weights, optimizer and RNG
    states; servers on another version get its weights first."""
    # -- precision and device (trainer.run.precision) --
    dtype: TrainDtype = "float32"
    """Trainer precision: ``float32``, or ``bfloat16`` (autocast: bf16 matmuls, fp32 master
    weights and optimizer state; the pushed weights are the fp32 ones)."""
    device: TrainDevice = "auto"
    """Trainer device: ``auto`` (CUDA when visible, else CPU), ``cpu`` or ``cuda``. Under
    ``torchrun`` it picks the backend too (``cuda``: nccl, one GPU per local rank)."""
    experts_implementation: ExpertsImplementation = "grouped_mm"
    """How the HF model computes its MoE experts (transformers' ``experts_implementation``):
    ``grouped_mm`` (transformers' default, what TRL trains with: each projection one grouped
    matmul over the experts' tokens) or ``eager`` (a loop over the experts: the reference the
    route tests compare with, the science grid's; the same log-probs and gradients to fp32
    rounding, a slower backward: docs/training.md)."""
    # -- fault tolerance (trainer/rollouts/server_pool.py) --
    server_timeout: float = 300.0
    """Seconds a server may fail transiently (refused, reset, 502/503, not ready) before it
    is dropped from the rotation; each call retries with backoff meanwhile. With no server
    left the run stops with a non-zero exit."""
    # -- start-up weight agreement (trainer/rollouts/weight_agreement.py) --
    on_mismatch: OnMismatch = "push"
    """A server whose weight fingerprints (``/v1/info``) differ from the starting weights
    (predictor: the checkpoint's in pr2, zero otherwise): ``push`` them to every server as
    the next version (one log line), or ``fail`` naming the server and how to reset it."""
    # -- weight transfer (trainer/rollouts/collective_push.py) --
    weight_transfer: WeightTransfer = "http"
    """How pushes travel: ``http``/``grpc``, a safetensors file over each server's own
    protocol (its URL scheme); ``gloo``, one gloo group of this trainer (rank 0) and every
    server's workers, through vLLM's weight-transfer engines (servers started with
    ``--enable-weight-transfer``; the control calls over each server's HTTP or gRPC); ``nccl``,
    the same through vLLM's upstream NCCL engine (CUDA only: refused at start-up without a
    GPU)."""
    weight_transfer_address: str = "127.0.0.1"
    """``gloo``: this trainer's address as the servers reach it (the group's TCPStore)."""
    # -- asynchronous rollouts (trainer/rollouts/async_rollouts.py) --
    behaviour_weight_cap: float = 5.0
    """Decoupled PPO (stale samples, ``max_staleness`` >= 1): tokens whose behaviour weight
    ``pi_prox / pi_server`` exceeds this are left out of the loss (AReaL's filter; 0: none)."""
    # -- the served predictor (trainer/algo/predictor_scale.py,
    # trainer/algo/lookahead.py) --
    predictor: PredictorKind = "lookahead"
    """pr2: ``learned`` (the paper's trained W_p), ``lookahead`` (no training: the routers'
    expected move over the next batch's off-policy mini-steps, read from their Adam state) or
    ``ridge`` (closed form: per layer the ridge map from ``h_old`` to the router's mean
    off-policy move over the last batches, ``ridge_strength``/``ridge_memory``)."""
    predictor_scale: str = "1"
    """pr2: the server gets alpha x the predictor (the trainer keeps the unscaled one): a number
    >= 0, or ``auto`` (alpha in [0, 1] fitted after each batch on how well the served offset
    predicted the router's actual move; 0 = R3 until there is evidence). Logged per step."""
    # -- load balancing (a setting with persistent router drift;
    # trainer/algo/load_balance.py)
    load_balance_coef: float = 0.0
    """Switch-style load-balancing loss on the routers, ``E * sum_e f_e * P_e`` per MoE layer,
    added to each mini-step's loss times this coefficient (0: off)."""

    def __post_init__(self) -> None:
        for name, choices in literal_choices(TrainConfig).items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        self.replay = ReplayMode(self.replay)
        if self.off_policy_steps < 1 or self.prompts_per_batch % self.off_policy_steps:
            raise ValueError("off_policy_steps must be >= 1 and divide prompts_per_batch")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2 (GRPO groups)")
        if not self.servers:
            raise ValueError("at least one server is needed")
        if self.max_staleness < 0 or self.behaviour_weight_cap < 0:
            raise ValueError("max_staleness and behaviour_weight_cap must be >= 0")
        if self.load_balance_coef < 0:
            raise ValueError(f"load_balance_coef must be >= 0, got {self.load_balance_coef}")
        if self.server_timeout < 0:
            raise ValueError("server_timeout must be >= 0 seconds")
        self._check_predictor_fields()
        if self.api_key is None:
            self.api_key = os.environ.get("PR2_API_KEY")
        self._check_data_fields()
        from trainer.algo.predictor_scale import parse_scale

        self.predictor_scale = str(parse_scale(self.predictor_scale))

    def _check_predictor_fields(self) -> None:
        """The predictor's lr (the deprecated multiplier converted) and ridge settings."""
        if self.predictor_lr_multiplier is not None:
            import warnings

            ratio = self.predictor_lr_multiplier / self.router_lr_multiplier
            warnings.warn(
                f"predictor_lr_multiplier is deprecated: predictor_lr_ratio = "
                f"{self.predictor_lr_multiplier:g} / router_lr_multiplier "
                f"{self.router_lr_multiplier:g} = {ratio:g} used (the predictor's lr is now "
                "keyed to the router's)",
                DeprecationWarning,
                stacklevel=3,
            )
            self.predictor_lr_ratio, self.predictor_lr_multiplier = ratio, None
        if self.predictor_lr_ratio < 0 or self.predictor_weight_decay < 0:
            raise ValueError("predictor_lr_ratio and predictor_weight_decay must be >= 0")
        if self.ridge_strength <= 0 or not 0 <= self.ridge_memory < 1:
            raise ValueError("ridge_strength must be > 0 and ridge_memory in [0, 1)")

    def _check_data_fields(self) -> None:
        """Data and reward fields: defaults resolved, combinations checked."""
        if self.dataset is None:
            self.dataset = f"toy:{self.task}"
        toy = self.dataset.startswith("toy:")
        if not self.reward:
            self.reward = ["toy" if toy else "exact"]
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and (self.eval_dataset or toy):
            raise ValueError(
                "eval_fraction splits a dataset file; not with eval_dataset or toy: data"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for "
                f"{len(self.reward)} reward functions {self.reward}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as logged and checkpointed: the key hidden, ``task`` null unless the
        data are a toy task (with a ``dataset`` file it is not used)."""
        d = asdict(self)
        d["api_key"] = "***" if self.api_key else None
        if not self.dataset.startswith("toy:"):
            d["task"] = None
        return d


def literal_choices(cls: type) -> dict[str, tuple]:
    """The allowed values of each ``Literal[...]`` (or enum) field of a dataclass."""
    hints = get_type_hints(cls).items()
    literals = {name: get_args(typ) for name, typ in hints if get_origin(typ) is Literal}
    enums = {
        name: tuple(m.value for m in typ)
        for name, typ in hints
        if isinstance(typ, type) and issubclass(typ, Enum)
    }
    return literals | enums


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string right after each field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _scalar_type(hint) -> type:
    """The type that parses a flag of a field: ``X`` for ``X`` or ``X | None``."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.suffix == ".toml":
        return tomllib.loads(p.read_text())
    import yaml

    return yaml.safe_load(p.read_text()) or {}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """``TrainConfig`` from ``--config FILE`` (YAML/TOML) and per-field flags."""
    docs = field_docs(TrainConfig)
    hints = get_type_hints(TrainConfig)
    choices = literal_choices(TrainConfig)
    ap = argparse.ArgumentParser(
        prog="pr2-train",
        description="PPO/GRPO with routing replay "
        "(none / R2 / R3 / PR2) against pr2 rollout servers.",
    )
    ap.add_argument("--config", help="YAML or TOML file with any of the fields below")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kw: dict[str, Any] = {"default": None, "help": f"{docs[f.name]} [{default}]"}
        if f.name == "servers":
            kw["nargs"] = "+"
        elif hints[f.name] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(hints[f.name]) is list:  # repeatable: --reward a --reward b, or a b
            kw.update(action="extend", nargs="+", type=get_args(hints[f.name])[0])
        elif f.name in choices:  # the value is checked by TrainConfig: a ValueError naming it
            kw["metavar"] = "{" + ",".join(choices[f.name]) + "}"
        else:
            kw["type"] = _scalar_type(hints[f.name])
        ap.add_argument(flag, **kw)
    args = ap.parse_args(argv)
    values: dict[str, Any] = load_file(args.config) if args.config else {}
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise SystemExit(f"unknown config keys: {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return TrainConfig(**values)
