"""The trainer's MoE expert kernels: transformers' ``eager`` loop over the experts against its
``grouped_mm`` (``pr2-train --experts-implementation``), on one training forward and backward of
the bench model (hidden 512, 16 experts, top-2) under the trainer's routing control with forced
routes, as a mini-step runs it: the same model, tokens and routes for both, alternated per
repeat, medians and the ratio eager ÷ grouped_mm measured in this run.

    .venv/bin/python benchmarks/experts.py            # writes benchmarks/results/experts.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_SPEC, write_results

IMPLS = ("eager", "grouped_mm")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=16, help="a mini-step's sequences")
    ap.add_argument("--tokens", type=int, default=140, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (vs_trl's)")
    ap.add_argument("--out", default="benchmarks/results/experts.json")
    args = ap.parse_args(argv)
    import torch

    from pr2_serve.tiny.tiny_model import make_tiny_model
    from trainer.algo.ppo import token_logprobs
    from trainer.algo.replay import RoutingControl
    from trainer.run.policy import Policy

    torch.set_num_threads(args.threads)
    times: dict[str, dict[str, list[float]]] = {i: {"forward": [], "backward": []} for i in IMPLS}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "bench", seed=0, spec=BENCH_SPEC)
        policy = Policy(str(model_dir), seed=0)
        x = torch.randint(0, 256, (args.sequences, args.tokens))
        ctl = RoutingControl(record=True)
        with policy.replay.control(ctl), torch.no_grad():
            policy.model(x)
        routes = ctl.recorded_routes()
        for _ in range(args.repeats + 1):  # the first round warms up, untimed
            for impl in IMPLS:
                policy.model.set_experts_implementation(impl)
                t0 = time.perf_counter()
                with policy.replay.control(RoutingControl(forced_ids=routes)):
                    lp = token_logprobs(policy.model(x).logits, x)
                t1 = time.perf_counter()
                lp.sum().backward()
                t2 = time.perf_counter()
                policy.model.zero_grad(set_to_none=True)
                times[impl]["forward"].append(t1 - t0)
                times[impl]["backward"].append(t2 - t1)
    median = {
        i: {phase: statistics.median(ts[1:]) for phase, ts in times[i].items()} for i in IMPLS
    }
    ratio = {
        phase: median["eager"][phase] / median["grouped_mm"][phase]
        for phase in ("forward", "backward")
    }
    for impl in IMPLS:
        m = median[impl]
        print(f"{impl:>10}: forward {m['forward']:.3f} s, backward {m['backward']:.3f} s")
    print(f"eager / grouped_mm: forward x{ratio['forward']:.2f}, backward x{ratio['backward']:.2f}")
    write_results(args.out, args, {"median_s": median, "eager_over_grouped_mm": ratio})


if __name__ == "__main__":
    main()
