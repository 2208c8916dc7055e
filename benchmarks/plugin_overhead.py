"""Throughput of the PR2 plugin vs stock vLLM on the same model and batch, in one run.

Three configurations through the same ``RolloutEngine`` loop (so only the model differs):
stock vLLM model class (``plugin=False``), PR2 with routes off, PR2 with routes on (predictor
matmul + capture + per-request route bookkeeping + transfer). Two models: the tiny test model and
a bench-sized one (hidden 512, 16 experts, top-2). Rounds alternate stock and PR2 engines; PR2's
routes off/on alternate inside one engine. Ratios of medians are printed (machines here are
noisy: compare ratios, not absolute tokens/s) and written to ``benchmarks/results/``.

    .venv/bin/python benchmarks/plugin_overhead.py [--rounds 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_SPEC, tokens_per_s, workload, write_results
from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling
from pr2_serve.tiny.tiny_model import TinySpec, make_tiny_model

MODELS = {"tiny (h64, 8e, top-2)": TinySpec(), "bench (h512, 16e, top-2)": BENCH_SPEC}


def run_tokens_per_s(engine: RolloutEngine, prompts, sampling: Sampling, routes: bool) -> float:
    return tokens_per_s(
        lambda: engine.generate(prompts, sampling, return_routes=routes, return_logprobs=True)
    )


def bench_model(name: str, spec: TinySpec, args, console: Console) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "m", seed=0, spec=spec)
        prompts = workload(args.batch)
        sampling = Sampling(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True)
        runs: dict[str, list[float]] = {"stock": [], "pr2 routes off": [], "pr2 routes on": []}
        for rnd in range(args.rounds):
            for plugin in (False, True):
                with RolloutEngine(
                    model_dir, plugin=plugin, max_model_len=512, enable_prefix_caching=False
                ) as engine:
                    run_tokens_per_s(engine, prompts[:4], sampling, routes=False)  # warm-up
                    for _ in range(args.repeats):
                        if not plugin:
                            runs["stock"].append(run_tokens_per_s(engine, prompts, sampling, False))
                            continue
                        runs["pr2 routes off"].append(
                            run_tokens_per_s(engine, prompts, sampling, False)
                        )
                        runs["pr2 routes on"].append(
                            run_tokens_per_s(engine, prompts, sampling, True)
                        )
            console.print(f"[dim]{name}: round {rnd + 1}/{args.rounds} done[/dim]")
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "tokens_per_s": med,
        "runs": runs,
        "ratio_routes_off": med["pr2 routes off"] / med["stock"],
        "ratio_routes_on": med["pr2 routes on"] / med["stock"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/plugin_overhead.json")
    args = ap.parse_args()
    console = Console()
    results = {name: bench_model(name, spec, args, console) for name, spec in MODELS.items()}
    table = Table(
        title=f"PR2 plugin vs stock vLLM (CPU, fp32 weights as stored, batch "
        f"{args.batch} x {args.max_tokens} tokens, median of "
        f"{args.rounds * args.repeats})"
    )
    for col in (
        "model",
        "stock tok/s",
        "PR2 routes off",
        "PR2 routes on",
        "off / stock",
        "on / stock",
    ):
        table.add_column(col, justify="right")
    for name, r in results.items():
        t = r["tokens_per_s"]
        table.add_row(
            name,
            f"{t['stock']:.0f}",
            f"{t['pr2 routes off']:.0f}",
            f"{t['pr2 routes on']:.0f}",
            f"{r['ratio_routes_off']:.3f}",
            f"{r['ratio_routes_on']:.3f}",
        )
    console.print(table)
    write_results(args.out, args, results)


if __name__ == "__main__":
    main()
