"""Rollout API costs, each against a baseline measured in the same run.

1. Route bytes per (token, layer): ours (uint8 raw / base64 in JSON) vs SGLang-style base64 of
   int32.
2. End-to-end tokens/s over HTTP and gRPC (a real ``pr2-serve`` on loopback) vs the in-process
   engine on the same model and batch. Goal >= 0.9. And the OpenAI-compatible
   ``/v1/completions`` (the ``openai`` client; token ids, log-probs and ``routed_experts``, the
   same payload) vs ``/v1/generate`` in the same run. Goal >= 0.9.
3. Weight push MB/s over HTTP and gRPC for a >= 200 MB checkpoint (goal >= 1 GB/s on loopback),
   split into transfer (upload streamed to disk + sha256), check (names, shapes, dtypes and
   finite values), apply (in-place reload + KV cache zeroed) and canary (a short greedy
   generate on the new weights), and the server's peak extra RSS during the push.

    .venv/bin/python benchmarks/api.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_SPEC, tokens_per_s, workload, write_results
from pr2_serve.client import GrpcClient, HttpClient
from pr2_serve.core.route_protocol import encode_routes
from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling
from pr2_serve.tiny.tiny_model import make_tiny_model
from tests.helpers import API_KEY, start_server


def tps(fn, repeats: int) -> list[float]:
    return [tokens_per_s(fn) for _ in range(repeats)]


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


def route_bytes(r: np.ndarray) -> dict:
    """Bytes per (token, layer) of our encodings vs SGLang-style base64 of int32."""
    cells = r.shape[0] * r.shape[1]
    raw = len(encode_routes(r).data)
    b64 = len(encode_routes(r).to_json()["data"])
    int32_b64 = len(base64.b64encode(r.astype("<i4").tobytes()))
    return {
        "ours_raw_grpc": raw / cells,
        "ours_base64_json": b64 / cells,
        "int32_base64": int32_b64 / cells,
        "ratio_json": b64 / int32_b64,
        "ratio_grpc": raw / int32_b64,
    }


def openai_completions(base_url: str):
    """``generate(prompts, **kw)`` through the ``openai`` client on ``/v1/completions``, asking
    for what ``/v1/generate`` sends: token ids, raw log-probs and routes."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0)
    model = client.models.list().data[0].id

    def generate(prompts, temperature, max_tokens, seed):
        res = client.completions.create(
            model=model,
            prompt=prompts,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            logprobs=0,
            extra_body={"return_token_ids": True, "return_routed_experts": True},
        )
        return [SimpleNamespace(output_token_ids=c.model_extra["token_ids"]) for c in res.choices]

    return generate


def protocol_tokens_per_s(http, rpc, oai, prompts, kw: dict, local: list[float], repeats: int):
    """Tokens/s over HTTP, gRPC and the OpenAI route (alternating) against the in-process
    figures ``local`` (and the OpenAI route against HTTP ``/v1/generate``)."""
    http.generate(prompts[:2], max_tokens=4)
    oai(prompts[:2], temperature=1.0, max_tokens=4, seed=0)
    over_http, over_grpc, over_openai = [], [], []
    for _ in range(repeats):
        over_http += tps(lambda: http.generate(prompts, **kw).samples, 1)
        over_grpc += tps(lambda: rpc.generate(prompts, **kw).samples, 1)
        over_openai += tps(lambda: oai(prompts, **kw), 1)
    runs = {"in_process": local, "http": over_http, "grpc": over_grpc, "openai": over_openai}
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        **med,
        "http_ratio": med["http"] / med["in_process"],
        "grpc_ratio": med["grpc"] / med["in_process"],
        "openai_vs_http_ratio": med["openai"] / med["http"],
    }


def weight_pushes(srv, http, rpc, file: Path) -> dict:
    """Push the whole checkpoint twice per protocol: MB/s end to end and for the transfer,
    apply seconds, the server's peak extra RSS (medians)."""
    size = file.stat().st_size
    pushes: dict[str, list[dict]] = {}
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
                "check_s": res["check_seconds"],  # names, shapes, dtypes, finite values
                "apply_s": res["apply_seconds"],
                "canary_s": res["canary_seconds"],  # the canary generate on the new weights
                "peak_extra_rss_MiB": rss,
            }
        )
    medians = {k: {m: statistics.median(p[m] for p in v) for m in v[0]} for k, v in pushes.items()}
    return {"checkpoint_MB": size / 1e6, **medians}


def report(results: dict, args) -> None:
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
        f"({tp['grpc_ratio']:.3f}); OpenAI /v1/completions {tp['openai']:.0f} "
        f"({tp['openai_vs_http_ratio']:.3f} x /v1/generate)"
    )
    for proto in ("http", "grpc"):
        p = wp[proto]
        print(
            f"weight push over {proto} ({wp['checkpoint_MB']:.0f} MB): end-to-end "
            f"{p['end_to_end_MBps']:.0f} MB/s, transfer {p['transfer_MBps']:.0f} MB/s, "
            f"check {p['check_s']:.2f} s, apply {p['apply_s']:.2f} s, "
            f"canary {p['canary_s']:.2f} s, peak extra server RSS {p['peak_extra_rss_MiB']:.0f} MiB"
        )


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
        model = make_tiny_model(Path(tmp) / "model", seed=0, spec=BENCH_SPEC, predictor="random")
        with RolloutEngine(model, max_model_len=512) as engine:  # the in-process baseline
            engine.generate(prompts[:2], Sampling(max_tokens=4))
            local = tps(lambda: engine.generate(prompts, Sampling(**kw)), args.repeats)
            sample = engine.generate(prompts[:1], Sampling(max_tokens=32, seed=0))[0]
        results["route_bytes_per_token_layer"] = route_bytes(sample.routes)
        srv = start_server(model, Path(tmp) / "state", "--max-upload-bytes", str(4 << 30))
        try:
            http, rpc = HttpClient(srv.http, api_key=API_KEY), GrpcClient(srv.grpc, API_KEY)
            oai = openai_completions(srv.http)
            results["tokens_per_s"] = protocol_tokens_per_s(
                http, rpc, oai, prompts, kw, local, args.repeats
            )
            results["weight_push"] = weight_pushes(srv, http, rpc, model / "model.safetensors")
        finally:
            srv.stop()
    report(results, args)
    write_results(args.out, args, results)


if __name__ == "__main__":
    main()
