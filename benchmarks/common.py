"""What the benchmarks share: the bench-sized model, the prompt workload, throughput timing,
and writing results (every benchmark prints ratios against a baseline measured in the same run)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pr2_serve.tiny.tiny_model import TinySpec

#: hidden 512, 16 experts, top-2, 4 layers: a ~214 MB fp32 checkpoint
BENCH_SPEC = TinySpec(
    hidden_size=512,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    num_experts=16,
    top_k=2,
    moe_intermediate_size=512,
    num_layers=4,
)


def workload(batch: int, seed: int = 0) -> list[list[int]]:
    """``batch`` random byte-token prompts of 16..63 tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(16, 64, size=batch)]


def tokens_per_s(generate) -> float:
    """Generated tokens per second of one call of ``generate()`` (returns samples)."""
    t = time.perf_counter()
    samples = generate()
    return sum(len(s.output_token_ids) for s in samples) / (time.perf_counter() - t)


def write_results(path: str, args, results: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {out}")
