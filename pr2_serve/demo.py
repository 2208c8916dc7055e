"""``make demo``: the end-to-end path on the embedded default (real vLLM on the CPU).

Today: make the tiny Qwen3-MoE -> start the PR2 engine -> generate rollouts with log-probs and
routes -> push a new predictor (weight version 1) -> generate again -> print what changed.
(The RL loop against the HTTP server joins here as the trainer lands.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

PROMPTS = ["12+35=", "sort 93172:", "count a in banana:", "hello", "7*8=", "abc", "the ", "MoE"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="pr2-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    console = Console()
    out = Path(args.out)
    from pr2_serve.engine import RolloutEngine, Sampling
    from pr2_serve.routes import encode_routes
    from pr2_serve.tiny_model import make_tiny_model

    t0 = time.perf_counter()
    model_dir = make_tiny_model(out / "model", seed=0, predictor="zero")
    console.print(f"[bold]1.[/bold] tiny Qwen3-MoE written to {model_dir}")
    with console.status("starting vLLM (CPU build) with the PR2 plugin..."):
        engine = RolloutEngine(model_dir, dtype="float32", max_model_len=512)
    info = engine.info
    console.print(
        f"[bold]2.[/bold] engine ready in {time.perf_counter() - t0:.1f}s: {info.architecture}, "
        f"{info.num_moe_layers} MoE layers x {info.num_experts} experts, top-{info.top_k}, "
        f"routes as {info.route_dtype}"
    )
    sampling = Sampling(n=args.samples, temperature=1.0, max_tokens=args.max_tokens, seed=0)
    with engine:
        first = engine.generate(PROMPTS, sampling)
        _summary(console, "3. rollouts at weight version 0 (zero predictor = R3)", first, info)
        g = torch.Generator().manual_seed(1)
        predictors = {
            f"model.layers.{i}.mlp.predictor.weight": torch.randn(info.num_experts, 64, generator=g)
            * 0.25
            for i in info.moe_layer_indices
        }
        res = engine.update_weights(predictors, version=1)
        console.print(
            f"[bold]4.[/bold] pushed {res.num_tensors} predictor tensors -> weight version "
            f"{res.weight_version} (in-place reload {res.reload_seconds * 1e3:.0f} ms)"
        )
        second = engine.generate(PROMPTS, sampling)
        _summary(console, "5. same requests at weight version 1 (live predictor)", second, info)
    moved = [
        float((np.sort(a.routes, -1) != np.sort(b.routes, -1)).any(-1).mean())
        for a, b in zip(first, second, strict=True)
        if a.output_token_ids == b.output_token_ids
    ]
    routes_bytes = sum(len(encode_routes(r.routes).data) for r in second)
    rows = sum(r.routes.shape[0] * r.routes.shape[1] for r in second)
    console.print(
        f"[bold]6.[/bold] the predictor moved {np.mean(moved) * 100 if moved else 0:.1f}% of "
        f"(token, layer) routes on samples whose tokens stayed the same; routes cost "
        f"{routes_bytes / rows:.1f} bytes per (token, layer) (int32 base64: "
        f"{4 * info.top_k * 4 / 3:.1f}). Done in {time.perf_counter() - t0:.1f}s."
    )


def _summary(console: Console, title: str, rollouts, info) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("prompt", "sample", "output (bytes)", "tokens", "mean logprob", "route rows"):
        table.add_column(col)
    for r in rollouts:
        if r.sample_index > 1:
            continue
        text = bytes(t for t in r.output_token_ids if t < 256).decode("utf-8", "replace")
        table.add_row(
            PROMPTS[r.prompt_index],
            str(r.sample_index),
            repr(text[:24]),
            str(len(r.output_token_ids)),
            f"{np.mean(r.logprobs):.3f}",
            f"{r.routes.shape[0]} x {r.routes.shape[1]} x {r.routes.shape[2]}",
        )
    console.print(table)
    usage = np.bincount(np.concatenate([r.routes.ravel() for r in rollouts]), minlength=8)
    share = " ".join(f"{u / usage.sum() * 100:.0f}%" for u in usage)
    console.print(f"   expert load over all routes: {share}  (v{rollouts[0].weight_version})")


if __name__ == "__main__":
    main()
