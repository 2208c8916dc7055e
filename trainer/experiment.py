"""``make experiment``: every replay mode x off-policy level x seed from one warm start.

Same warmed-up checkpoint, same prompts per seed; one fresh ``pr2-serve`` per cell. Writes
``<out>/cells/<mode>-off<k>-s<seed>/metrics.jsonl``, ``<out>/results.json`` (one entry per cell
plus per (mode, off-policy) aggregates over seeds) and ``<out>/*.png``; then regenerate the
README's results section from the results file with ``python -m trainer.report``.

    python -m trainer.experiment --out runs/experiment [--steps 60] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import secrets
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import REPLAY_MODES, TrainConfig
from .tasks import Task


def instability_events(rows: list[dict]) -> dict[str, int]:
    """Reward collapses (a 5-step mean below half the first 5 steps' mean, while that was
    > 0.05), grad-norm spikes (> 10x the run's median), NaN metrics."""
    rewards = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
    start = float(np.mean(rewards[:5])) if rewards else 0.0
    collapses = 0
    if start > 0.05:
        window = [float(np.mean(rewards[i : i + 5])) for i in range(len(rewards) - 4)]
        collapses = sum(1 for a, b in itertools.pairwise(window) if a >= start / 2 > b)
    norms = [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]
    med = statistics.median(norms) if norms else 0.0
    spikes = sum(1 for g in norms if med > 0 and g > 10 * med)
    nans = sum(1 for r in rows for v in r.values() if isinstance(v, float) and math.isnan(v))
    return {"reward_collapse": collapses, "grad_norm_spike": spikes, "nan": nans}


def summarize_cell(rows: list[dict], wall: float) -> dict:
    def mean(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    hist = np.sum([r["deviation_hist"] for r in rows if r.get("deviation_hist")], axis=0)
    evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
    return {
        "zero_deviation": mean("zero_deviation"),
        "zero_deviation_offpolicy": mean("zero_deviation_offpolicy"),
        "deviation_hist": [int(x) for x in hist],
        "train_infer_kl": mean("train_infer_kl"),
        "predictor_hit_rate": mean("predictor_hit_rate"),
        "zero_predictor_hit_rate": mean("zero_predictor_hit_rate"),
        "rollout_predictor_hit_rate": mean("rollout_predictor_hit_rate"),
        "router_drift_rel": mean("router_drift_rel"),
        "router_drift_cos_prev": mean("router_drift_cos_prev"),
        "final_eval_accuracy": evals[-1] if evals else None,
        "reward_first": mean_of([r.get("reward_mean") for r in rows[:5]]),
        "reward_last": mean_of([r.get("reward_mean") for r in rows[-5:]]),
        "instability": instability_events(rows),
        "wall_time_s": wall,
        "steps": len(rows),
    }


def mean_of(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def aggregate(cells: list[dict]) -> list[dict]:
    """Per (mode, off-policy): mean and spread (max - min over seeds) of the headline numbers."""
    out = []
    keys = sorted(
        {(c["replay"], c["off_policy_steps"]) for c in cells},
        key=lambda k: (k[1], REPLAY_MODES.index(k[0])),
    )
    for mode, off in keys:
        group = [c for c in cells if (c["replay"], c["off_policy_steps"]) == (mode, off)]
        agg = {"replay": mode, "off_policy_steps": off, "seeds": [c["seed"] for c in group]}
        for key in (
            "zero_deviation_offpolicy",
            "zero_deviation",
            "train_infer_kl",
            "predictor_hit_rate",
            "final_eval_accuracy",
            "wall_time_s",
        ):
            vals = [c[key] for c in group if c.get(key) is not None]
            agg[key] = float(np.mean(vals)) if vals else None
            agg[key + "_spread"] = float(max(vals) - min(vals)) if len(vals) > 1 else 0.0
        agg["deviation_hist"] = [
            int(x) for x in np.sum([c["deviation_hist"] for c in group], axis=0)
        ]
        agg["instability_events"] = int(sum(sum(c["instability"].values()) for c in group))
        out.append(agg)
    return out


def run_cell(
    model_dir: Path,
    out: Path,
    mode: str,
    off: int,
    seed: int,
    steps: int,
    lr: float,
    pred_mult: float,
    router_mult: float = 1.0,
    pred_loss: str = "kl-post",
    name: str | None = None,
    prompts: int = 32,
) -> dict:
    from pr2_serve.launch import start_server

    from .loop import Trainer

    cell = out / "cells" / (name or f"{mode}-off{off}-s{seed}")
    shutil.rmtree(cell, ignore_errors=True)
    cell.mkdir(parents=True)
    key = secrets.token_hex(16)
    t0 = time.perf_counter()
    server = start_server(model_dir, cell / "server-state", api_key=key)
    try:
        cfg = TrainConfig(
            servers=[server.http],
            model_dir=str(model_dir),
            task="addition",
            task_digits=2,
            replay=mode,
            off_policy_steps=off,
            prompts_per_batch=prompts,
            samples_per_prompt=8,
            max_tokens=6,
            lr=lr,
            predictor_lr_multiplier=pred_mult,
            predictor_loss=pred_loss,
            router_lr_multiplier=router_mult,
            steps=steps,
            eval_every=max(1, steps // 4),
            eval_size=128,
            seed=seed,
            output_dir=str(cell),
            api_key=key,
        )
        with Trainer(cfg, log=lambda *a: None) as trainer:
            rows = trainer.run()
    finally:
        server.stop()
        shutil.rmtree(cell / "server-state", ignore_errors=True)
    return {
        "replay": mode,
        "off_policy_steps": off,
        "seed": seed,
        **summarize_cell(rows, time.perf_counter() - t0),
    }


#: The investigation grid (off-policy 8, one seed): router drift size, predictor lr, loss type.
#: One run a row: (mode, router lr x, predictor lr x, predictor loss, prompts per batch, experts).
INVESTIGATION_TABLE = """
none  1   0    kl-post  32   8
pr2   1   10   kl-post  32   8
none  30  0    kl-post  32   8
pr2   30  1    kl-post  32   8
pr2   30  10   kl-post  32   8
pr2   30  100  kl-post  32   8
pr2   30  10   l2       32   8
pr2   30  100  l2       32   8
none  30  0    kl-post  128  8
pr2   30  10   kl-post  128  8
pr2   30  10   l2       128  8
none  30  0    kl-post  32   32
pr2   30  10   kl-post  32   32
"""
# rows 9-11: 4x the batch (less gradient noise, so maybe more consistent drift between
# batches); rows 12-13: 4x the experts (32, top-2: its own base model, warmed up the same way)
INVESTIGATION = tuple(
    (mode, float(router), float(pred), loss, int(prompts), int(experts))
    for mode, router, pred, loss, prompts, experts in map(
        str.split, INVESTIGATION_TABLE.strip().splitlines()
    )
)


def _key(r: dict) -> tuple:
    return (
        r["replay"],
        r["router_lr_multiplier"],
        r["predictor_lr_multiplier"],
        r["loss"],
        r.get("prompts_per_batch", 32),
        r.get("num_experts", 8),
    )


def warm_model(out: Path, router_std: float, experts: int = 8) -> Path:
    """The warmed-up start of every run (made once, then reused)."""
    suffix = "" if experts == 8 else f"-e{experts}"
    model_dir = out / f"model{suffix}"
    if not (model_dir / "model.safetensors").exists():
        from pr2_serve.tiny_model import TinySpec, make_tiny_model

        from .warmup import warmup

        spec = TinySpec(router_std=router_std, num_experts=experts)
        base = make_tiny_model(out / f"base{suffix}", seed=0, spec=spec)
        warmup(base, model_dir, Task("addition", 2), target_accuracy=0.2, seed=0)
    return model_dir


def investigate(out: Path, path: Path, steps: int, lr: float, off: int, router_std: float) -> None:
    """Why PR2 does (not) beat R3 here: each row one run; resumable like the main grid."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    done = {_key(r) for r in runs}
    for mode, rmult, pmult, loss, prompts, experts in tqdm(
        [c for c in INVESTIGATION if c not in done], desc="investigation"
    ):
        model_dir = warm_model(out, router_std, experts)
        name = f"inv-{mode}-router{rmult:g}-pred{pmult:g}-{loss}-p{prompts}-e{experts}"
        cell = run_cell(model_dir, out, mode, off, 0, steps, lr, pmult, rmult, loss, name, prompts)
        runs.append(
            {
                "router_lr_multiplier": rmult,
                "predictor_lr_multiplier": pmult,
                "loss": loss,
                "prompts_per_batch": prompts,
                "num_experts": experts,
                **cell,
            }
        )
        path.write_text(
            json.dumps({"steps": steps, "off_policy_steps": off, "lr": lr, "runs": runs}, indent=1)
        )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if args.investigate:
        investigate(out, Path(args.investigate), args.steps, args.lr, 8, args.router_std)
        return
    model_dir = warm_model(out, args.router_std)
    results_path = Path(args.results or out / "results.json")
    cells = []
    if results_path.exists():  # resume: keep finished cells
        cells = json.loads(results_path.read_text()).get("cells", [])
    done = {(c["replay"], c["off_policy_steps"], c["seed"]) for c in cells}
    todo = [
        (m, o, s)
        for o in args.off_policy
        for m in args.modes
        for s in args.seeds
        if (m, o, s) not in done
    ]
    for mode, off, seed in tqdm(todo, desc="cells"):
        cells.append(
            run_cell(
                model_dir,
                out,
                mode,
                off,
                seed,
                args.steps,
                args.lr,
                args.predictor_lr_multiplier,
                args.router_lr_multiplier,
            )
        )
        _write(results_path, args, cells)
    _write(results_path, args, cells)
    from .report import plot_results

    plot_results(json.loads(results_path.read_text()), out)
    print(
        f"wrote {results_path}; regenerate the README with: python -m trainer.report "
        f"{results_path} README.md"
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pr2-experiment", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", choices=REPLAY_MODES, default=list(REPLAY_MODES))
    ap.add_argument("--off-policy", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--predictor-lr-multiplier", type=float, default=10.0)
    ap.add_argument(
        "--router-std",
        type=float,
        default=0.02,
        help="router init std of the base model (HF's 0.02: routes that can drift)",
    )
    ap.add_argument(
        "--router-lr-multiplier",
        type=float,
        default=30.0,
        help="router lr = lr x this (a lever for router drift)",
    )
    ap.add_argument("--results", default=None, help="default: <out>/results.json")
    ap.add_argument(
        "--investigate",
        metavar="PATH",
        default=None,
        help="instead of the grid, run the investigation runs (off-policy 8, seed 0) into PATH",
    )
    return ap


def _write(path: Path, args, cells: list[dict]) -> None:
    settings = {
        "task": "addition (2 digits)",
        "steps": args.steps,
        "lr": args.lr,
        "predictor_lr_multiplier": args.predictor_lr_multiplier,
        "router_lr_multiplier": args.router_lr_multiplier,
        "prompts_per_batch": 32,
        "samples_per_prompt": 8,
        "model": "tiny Qwen3-MoE "
        "(hidden 64, 4 MoE layers, 8 experts, top-2), warmed up to ~20-30 % accuracy",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"settings": settings, "cells": cells, "aggregates": aggregate(cells)}, indent=1)
    )


if __name__ == "__main__":
    main()
