"""``make demo``: the whole PR2 loop on the embedded default (real vLLM on the CPU).

tiny Qwen3-MoE -> supervised warm-up on 2-digit addition (until held-out accuracy is clearly
above zero, far from perfect) -> ``pr2-serve`` on it (a subprocess, real HTTP on loopback) ->
``pr2-train --replay pr2`` -> per-step table, summary, ``runs/demo/metrics.jsonl`` and
``runs/demo/metrics.png`` -> the server is stopped, also on Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from trainer.data.tasks import Task
from trainer.run.cli import COLUMNS, format_line, format_row
from trainer.run.config import REPLAY_MODES, TrainConfig, literal_choices


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    console = Console()
    out = Path(args.out)
    t_start = time.perf_counter()
    model_dir = _warm_model(console, args, out, Task("addition", digits=2))

    # 2. the server
    from pr2_serve.server.launch import start_server

    state = out / "server-state"
    shutil.rmtree(state, ignore_errors=True)
    key = secrets.token_hex(16)
    with console.status("starting pr2-serve (vLLM CPU build + PR2 plugin)..."):
        server = start_server(model_dir, state, api_key=key)
    console.print(f"[bold]2.[/bold] pr2-serve ready at {server.http} (gRPC {server.grpc})")
    try:
        history, baseline = _train(console, args, server.http, key, model_dir, out)
    finally:
        server.stop()
        console.print("   server stopped")
    _summarize(console, args, out, history, baseline, t_start)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pr2-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--replay", choices=REPLAY_MODES, default="pr2")
    ap.add_argument("--warmup-target", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--predictor", choices=literal_choices(TrainConfig)["predictor"], default=None)
    ap.add_argument("--off-policy-steps", type=int, default=2)
    return ap


def _warm_model(console: Console, args, out: Path, task: Task) -> Path:
    """1. model + warm-up (reused if a previous demo made it)."""
    from pr2_serve.tiny.tiny_model import make_tiny_model

    model_dir = out / "model"
    if not (model_dir / "model.safetensors").exists():
        from trainer.experiments.warmup import warmup

        base = make_tiny_model(out / "base", seed=args.seed)
        console.print(
            f"[bold]1.[/bold] tiny Qwen3-MoE at {base}; supervised warm-up on 2-digit addition"
        )
        res = warmup(base, model_dir, task, target_accuracy=args.warmup_target, seed=args.seed)
        console.print(
            f"   warm-up: {res.steps} steps, held-out accuracy {res.eval_accuracy:.2f}"
            f" -> checkpoint {model_dir}"
        )
    else:
        console.print(f"[bold]1.[/bold] reusing the warmed-up checkpoint {model_dir}")
    return model_dir


def _summarize(
    console: Console, args, out: Path, history: list[dict], baseline: float, t_start: float
) -> None:
    """3. summary + plot."""
    from trainer.experiments.plots import plot_run

    png = plot_run(
        history,
        out / "metrics.png",
        title=f"pr2 demo: replay={args.replay}",
        eval_baseline=baseline,
    )
    k = max(1, len(history) // 5)
    r0 = np.mean([m["reward_mean"] for m in history[:k]])
    r1 = np.mean([m["reward_mean"] for m in history[-k:]])
    evals = [baseline] + [m["eval_accuracy"] for m in history if m.get("eval_accuracy") is not None]
    zd = np.mean([m["zero_deviation"] for m in history])
    zd_off = [
        m["zero_deviation_offpolicy"]
        for m in history
        if m.get("zero_deviation_offpolicy") is not None
    ]
    console.print(
        f"[bold]summary[/bold]: reward {r0:.3f} (first {k} steps) -> {r1:.3f} (last {k}); "
        f"held-out accuracy {evals[0] if evals else float('nan'):.3f} -> "
        f"{evals[-1] if evals else float('nan'):.3f}; zero-deviation {100 * zd:.1f}% "
        f"(off-policy mini-steps {100 * np.mean(zd_off) if zd_off else float('nan'):.1f}%); "
        f"train-infer KL {np.mean([m['train_infer_kl'] for m in history]):.2e}; "
        f"{time.perf_counter() - t_start:.0f}s total"
    )
    console.print(f"   metrics: {out / 'metrics.jsonl'}   plot: {png}")


def _train(
    console: Console, args, server: str, key: str, model_dir: Path, out: Path
) -> tuple[list[dict], float]:
    from trainer.run.loop import Trainer

    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cfg = TrainConfig(
        servers=[server],
        model_dir=str(model_dir),
        task="addition",
        task_digits=2,
        replay=args.replay,
        off_policy_steps=args.off_policy_steps,
        prompts_per_batch=32,
        samples_per_prompt=8,
        max_tokens=6,
        lr=args.lr,
        **({"predictor": args.predictor} if args.predictor else {}),  # default: the trainer's
        steps=args.steps,
        eval_every=5,
        eval_size=128,
        seed=args.seed,
        output_dir=str(out),
        api_key=key,
    )
    console.print(f"[bold]3.[/bold] pr2-train {json.dumps(cfg.to_dict())}")
    table = Table(*[c for c, _ in COLUMNS], title="per step")
    with Trainer(cfg) as trainer:
        baseline = trainer.evaluate()
        console.print(f"   held-out accuracy before RL: {baseline:.3f}")
        with console.status("training...") as status:

            def on_step(m: dict) -> None:
                table.add_row(*format_row(m))
                status.update(f"step {m['step']}/{cfg.steps}: reward {m['reward_mean']:.3f}")
                console.print("   " + format_line(m))

            history = trainer.run(on_step)
    console.print(table)
    return history, baseline


if __name__ == "__main__":
    main()
