"""Trainer steps/s of the synchronous loop (``--max-staleness 0``) vs asynchronous rollouts
(``--max-staleness 1``: the next batch is generated while this one trains), on the demo config,
against one real ``pr2-serve`` (fp32, CPU) in the same run.

    PYTHONPATH=$PWD python -m benchmarks.staleness --model runs/demo/model

The demo's training config (``trainer/experiments/demo.py``: pr2, 32 prompts x 8 samples, 6
tokens, 2 off-policy mini-steps, lr 2e-4, predictor lr x10) without the periodic eval. The runs
alternate (K=0, K=1, K=0, ... ``--repeats`` times each) so that a change of load on the machine
hits both; steps/s counts the steps after the first (the first step is synchronous in both modes),
from the wall time between the ends of steps. Also prints the median time of a rollout request and
of a training step (each mode). Writes ``benchmarks/results/staleness.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results
from pr2_serve.server.launch import start_server


def demo_config(server: str, key: str, model: str, out: Path, steps: int, staleness: int):
    from trainer.run.config import TrainConfig

    return TrainConfig(
        servers=[server],
        model_dir=model,
        task="addition",
        task_digits=2,
        replay="pr2",
        off_policy_steps=2,
        prompts_per_batch=32,
        samples_per_prompt=8,
        max_tokens=6,
        lr=2e-4,
        predictor_lr_ratio=10.0,
        steps=steps,
        eval_every=0,
        seed=0,
        output_dir=str(out),
        api_key=key,
        max_staleness=staleness,
    )


def run(cfg) -> dict:
    """One run; its steps/s (after the first step) and per-step timings."""
    from trainer.run.loop import Trainer

    ends: list[float] = []
    with Trainer(cfg, log=lambda _: None) as trainer:
        rows = trainer.run(lambda m: ends.append(time.perf_counter()))
    steps_per_s = (len(ends) - 1) / (ends[-1] - ends[0])
    return {
        "steps_per_s": steps_per_s,
        "step_seconds": [round(b - a, 3) for a, b in itertools.pairwise(ends)],
        "median_time_train": statistics.median(m["time_old_pass"] + m["time_train"] for m in rows),
        "median_time_rollout_wait": statistics.median(m["time_rollout"] for m in rows[1:]),
        "median_time_push": statistics.median(m["time_push"] for m in rows),
        "rollout_lag_max": max(m["rollout_lag_max"] or 0 for m in rows),
        "dropped_stale": rows[-1]["dropped_stale"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/staleness.json")
    args = ap.parse_args(argv)
    key = secrets.token_hex(16)
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(args.model, Path(tmp) / "state", api_key=key, timeout=900)  # fp32
        try:
            for r in range(args.repeats):
                for k in (0, 1):
                    out = Path(tmp) / f"k{k}-{r}"
                    res = run(demo_config(srv.http, key, args.model, out, args.steps, k))
                    runs[str(k)].append(res)
                    print(
                        f"--max-staleness {k} (run {r + 1}): {res['steps_per_s']:.3f} steps/s, "
                        f"train {res['median_time_train']:.2f} s, rollout wait "
                        f"{res['median_time_rollout_wait']:.2f} s, push "
                        f"{res['median_time_push']:.2f} s, max lag {res['rollout_lag_max']}"
                    )
        finally:
            srv.stop()
    sync = statistics.mean(x["steps_per_s"] for x in runs["0"])
    async_ = statistics.mean(x["steps_per_s"] for x in runs["1"])
    results = {
        "steps_per_s": {"max_staleness_0": sync, "max_staleness_1": async_},
        "ratio": async_ / sync,
        "runs": runs,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    print(f"steps/s: synchronous {sync:.3f}, staleness 1 {async_:.3f}: x{async_ / sync:.2f}")
    write_results(args.out, args, results)


if __name__ == "__main__":
    main()
