"""Plain vs PR2 routing cost per MoE layer, eager and torch.compile'd, under CUDA graphs.

Uses the project's own routing (:func:`pr2_serve.core.routing.pr2_route`) at Qwen3-30B-A3B's router
shape (hidden 2048, 128 experts, top-8) for 1..8192 tokens. Both variants include the router
GEMM; PR2 adds the predictor (``topk(z + W_p h)``, fused as one ``addmm``). Each function is
captured in a CUDA graph per token count and replayed, as vLLM's CUDA build runs decode steps.
Checks: zero predictor -> PR2 ids == plain ids; compiled ids == eager ids. Goal: PR2 costs at
most +1 us per layer over plain when compiled.

    bash benchmarks/gpu_check.sh                          # the whole GPU check, this included
    PYTHONPATH=. python benchmarks/gpu_routing.py         # CUDA (H100: ~1 minute)
    python benchmarks/gpu_routing.py --device cpu --tokens 1 64 --hidden 256 --experts 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pr2_serve.core.routing import pr2_route


def plain(h, w_r, w_p, k):
    return pr2_route(h, F.linear(h, w_r), None, k, True)


def pr2(h, w_r, w_p, k):
    return pr2_route(h, F.linear(h, w_r), w_p, k, True)


def time_us(fn, args, iters: int, device: str) -> float:
    if device != "cuda":
        for _ in range(3):
            fn(*args)
        t = time.perf_counter()
        for _ in range(iters):
            fn(*args)
        return (time.perf_counter() - t) / iters * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up (and compile) outside the graph
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def same_sets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.long().sort(-1).values, b.long().sort(-1).values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096, 8192])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a smoke run")
    dev, dtype, k = args.device, getattr(torch, args.dtype), args.top_k
    g = torch.Generator(device="cpu").manual_seed(0)
    w_r = (torch.randn(args.experts, args.hidden, generator=g) * 0.02).to(dev, dtype)
    w_p = (torch.randn(args.experts, args.hidden, generator=g) * 0.01).to(dev, dtype)
    variants = {"eager": (plain, pr2)}
    if not args.no_compile:
        variants["compiled"] = (
            # dynamic shapes, as the plugin compiles its routing (one graph for all sizes)
            torch.compile(plain, fullgraph=True, dynamic=True),
            torch.compile(pr2, fullgraph=True, dynamic=True),
        )
    rows = []
    print(f"{'tokens':>7} {'mode':>9} {'plain us':>9} {'pr2 us':>9} {'delta us':>9}  checks")
    for n in args.tokens:
        h = torch.randn(n, args.hidden, generator=g).to(dev, dtype)
        zero = torch.zeros_like(w_p)
        ref_ids = pr2(h, w_r, w_p, k)[1]
        for mode, (fp, fq) in variants.items():
            ok = same_sets(fq(h, w_r, zero, k)[1], fp(h, w_r, w_p, k)[1]) and same_sets(
                fq(h, w_r, w_p, k)[1], ref_ids
            )
            tp = time_us(fp, (h, w_r, w_p, k), args.iters, dev)
            tq = time_us(fq, (h, w_r, w_p, k), args.iters, dev)
            rows.append(
                {
                    "tokens": n,
                    "mode": mode,
                    "plain_us": tp,
                    "pr2_us": tq,
                    "delta_us": tq - tp,
                    "routes_equal": bool(ok),
                }
            )
            print(
                f"{n:>7} {mode:>9} {tp:>9.2f} {tq:>9.2f} {tq - tp:>+9.2f}  "
                f"{'routes equal' if ok else 'ROUTES DIFFER'}"
            )
    worst = {m: max(r["delta_us"] for r in rows if r["mode"] == m) for m in variants}
    print("worst delta per layer: " + ", ".join(f"{m} {d:+.2f} us" for m, d in worst.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if not all(r["routes_equal"] for r in rows):
        raise SystemExit("route equality check failed")


if __name__ == "__main__":
    main()
