"""Where the default predictor lr comes from: short pr2 runs at several predictor lr multipliers
against one real ``pr2-serve`` (fp32), and an r3 run of the same length as the reference.

    PYTHONPATH=$PWD python -m benchmarks.predictor_lr --model runs/demo/model

Each run is the README's Train example (defaults: ``--off-policy-steps 2``, lr 1e-4, 16 x 8
samples, 8 tokens) for ``--steps`` steps; the trainer's start-up sync
(trainer/rollouts/weight_agreement.py) puts the
server back on the model's weights (zero predictor) before each run. Per step it records the
off-policy zero-deviation (mini-steps >= 2: the share of routed tokens whose trainer top-k equals
the served routes), the predictor's hit rate (in sample, and out of sample: the predictor the
server routed this batch with) and the train-infer KL. Writes
``benchmarks/results/predictor_lr.json``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
from pathlib import Path

from benchmarks.common import write_results
from pr2_serve.server.launch import start_server

KEYS = (
    "zero_deviation_offpolicy",
    "zero_deviation",
    "predictor_hit_rate",
    "rollout_predictor_hit_rate",
    "train_infer_kl",
    "reward_mean",
)


def train(server: str, key: str, model: str, out: Path, replay: str, steps: int, extra=()):
    """One ``pr2-train`` run in this process; its per-step metrics."""
    import os

    from trainer.run.cli import main as train_main

    os.environ["PR2_API_KEY"] = key
    argv = ["--servers", server, "--model-dir", model, "--replay", replay]
    argv += ["--off-policy-steps", "2", "--steps", str(steps), "--eval-every", "0"]
    train_main([*argv, "--output-dir", str(out), *extra])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in ("step", *KEYS)} for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--multipliers", type=float, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="benchmarks/results/predictor_lr.json")
    args = ap.parse_args(argv)
    key = secrets.token_hex(16)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(args.model, Path(tmp) / "state", api_key=key)  # fp32
        try:
            for seed in args.seeds:
                runs = {"r3": ("r3", [])}
                for m in args.multipliers:
                    runs[f"pr2 x{m:g}"] = ("pr2", ["--predictor-lr-multiplier", str(m)])
                for name, (replay, extra) in runs.items():
                    out = Path(tmp) / f"{name.replace(' ', '_')}-{seed}"
                    rows = train(
                        srv.http, key, args.model, out, replay, args.steps,
                        [*extra, "--seed", str(seed)],
                    )  # fmt: skip
                    results.setdefault(name, {})[f"seed {seed}"] = rows
                    off = [r["zero_deviation_offpolicy"] for r in rows]
                    print(f"{name:>12} seed {seed}: off-policy zero-deviation {off}")
        finally:
            srv.stop()
    write_results(args.out, args, results)


if __name__ == "__main__":
    main()
