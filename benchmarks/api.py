"""Rollout API costs, each against a baseline measured in the same run.

1. Route bytes per (token, layer): ours (uint8 raw / base64 in JSON) vs SGLang-style base64 of
   int32.
2. End-to-end tokens/s over HTTP and gRPC (a real ``pr2-serve`` on loopback) vs the in-process
   engine on the same model and batch. Goal >= 0.9.
3. Weight push MB/s over HTTP and gRPC for a >= 200 MB checkpoint (goal >= 1 GB/s on loopback),
   split into transfer (upload streamed to disk + sha256) and apply (in-place reload), and the
   server's peak extra RSS during the push.

    .venv/bin/python benchmarks/api.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pr2_serve.client import GrpcClient, HttpClient
from pr2_serve.engine import RolloutEngine, Sampling
from tests.helpers import API_KEY, start_server
from pr2_serve.routes import encode_routes
from pr2_serve.tiny_model import TinySpec, make_tiny_model

BIG = TinySpec(
    hidden_size=512,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    num_experts=16,
    moe_intermediate_size=512,
    num_layers=4,
)


def workload(batch: int):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(16, 64, size=batch)]


def tps(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        samples = fn()
        out.append(sum(len(s.output_token_ids) for s in samples) / (time.perf_counter() - t))
    return out


def peak_rss_during(pid: int, fn):
    proc = psutil.Process(pid)
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return result, (peak[0] - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/api.json")
    ap.add_argument("--workdir", default="runs", help="model + server state (a fast disk)")
    args = ap.parse_args()
    results: dict = {}
    prompts = workload(args.batch)
    kw = {"temperature": 1.0, "max_tokens": args.max_tokens, "seed": 0}
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model", seed=0, spec=BIG, predictor="random")
        size = (model / "model.safetensors").stat().st_size
        # -- in-process baseline ---------------------------------------------------------------
        with RolloutEngine(model, max_model_len=512) as engine:
            engine.generate(prompts[:2], Sampling(max_tokens=4))
            local = tps(lambda: engine.generate(prompts, Sampling(**kw)), args.repeats)
            sample = engine.generate(prompts[:1], Sampling(max_tokens=32, seed=0))[0]
        # -- route bytes ------------------------------------------------------------------------
        r = sample.routes
        cells = r.shape[0] * r.shape[1]
        raw = len(encode_routes(r).data)
        b64 = len(encode_routes(r).to_json()["data"])
        int32_b64 = len(__import__("base64").b64encode(r.astype("<i4").tobytes()))
        results["route_bytes_per_token_layer"] = {
            "ours_raw_grpc": raw / cells,
            "ours_base64_json": b64 / cells,
            "int32_base64": int32_b64 / cells,
            "ratio_json": b64 / int32_b64,
            "ratio_grpc": raw / int32_b64,
        }
        # -- server -----------------------------------------------------------------------------
        srv = start_server(model, tmp / "state", "--max-upload-bytes", str(4 << 30))
        try:
            http, rpc = HttpClient(srv.http, api_key=API_KEY), GrpcClient(srv.grpc, API_KEY)
            http.generate(prompts[:2], max_tokens=4)
            over_http, over_grpc = [], []
            for _ in range(args.repeats):  # alternate protocols
                over_http += tps(lambda: http.generate(prompts, **kw).samples, 1)
                over_grpc += tps(lambda: rpc.generate(prompts, **kw).samples, 1)
            med = {
                k: statistics.median(v)
                for k, v in {"in_process": local, "http": over_http, "grpc": over_grpc}.items()
            }
            results["tokens_per_s"] = {
                **med,
                "http_ratio": med["http"] / med["in_process"],
                "grpc_ratio": med["grpc"] / med["in_process"],
            }
            pushes = {}
            file = model / "model.safetensors"
            for version, (name, client) in enumerate([("http", http), ("grpc", rpc)] * 2, 1):
                t = time.perf_counter()
                res, rss = peak_rss_during(
                    srv.proc.pid, lambda c=client, v=version: c.push_weights(str(file), v)
                )
                wall = time.perf_counter() - t
                pushes.setdefault(name, []).append(
                    {
                        "end_to_end_MBps": size / wall / 1e6,
                        "transfer_MBps": size / res["receive_seconds"] / 1e6,
                        "apply_s": res["apply_seconds"],
                        "peak_extra_rss_MiB": rss,
                    }
                )
            results["weight_push"] = {
                "checkpoint_MB": size / 1e6,
                **{
                    k: {m: statistics.median(p[m] for p in v) for m in v[0]}
                    for k, v in pushes.items()
                },
            }
        finally:
            srv.stop()
    rb, tp, wp = (
        results["route_bytes_per_token_layer"],
        results["tokens_per_s"],
        results["weight_push"],
    )
    print(
        f"route bytes per (token, layer): ours {rb['ours_raw_grpc']:.2f} raw (gRPC) / "
        f"{rb['ours_base64_json']:.2f} base64 (JSON) vs int32-base64 {rb['int32_base64']:.2f}"
        f"  -> {rb['ratio_grpc']:.3f}x / {rb['ratio_json']:.3f}x"
    )
    print(
        f"tokens/s (batch {args.batch} x {args.max_tokens}): in-process {tp['in_process']:.0f}, "
        f"HTTP {tp['http']:.0f} ({tp['http_ratio']:.3f}), gRPC {tp['grpc']:.0f} "
        f"({tp['grpc_ratio']:.3f})"
    )
    for proto in ("http", "grpc"):
        p = wp[proto]
        print(
            f"weight push over {proto} ({wp['checkpoint_MB']:.0f} MB): end-to-end "
            f"{p['end_to_end_MBps']:.0f} MB/s, transfer {p['transfer_MBps']:.0f} MB/s, "
            f"apply {p['apply_s']:.2f} s, peak extra server RSS {p['peak_extra_rss_MiB']:.0f} MiB"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
