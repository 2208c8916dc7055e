"""Weight updates end to end on the bench-sized checkpoint, in one run: HTTP push vs gloo
transfer (``POST /v1/weights/transfer/...``, vLLM's weight-transfer engines).

End to end = the trainer's state dict in memory -> the server answering a generate on the new
version (HTTP: the client writes the safetensors file, uploads it; the server hashes, checks,
applies, runs the canary, commits. gloo: the trainer broadcasts packed buckets, the worker
writes them into the staged file; then the same check/apply/canary/commit). Also the server's
receive MB/s and its peak extra RSS during the update. Goal: gloo >= 1 GB/s end to end.

    .venv/bin/python benchmarks/weights.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.api import peak_rss_during
from benchmarks.common import BENCH_SPEC, write_results
from pr2_serve.client import HttpClient
from pr2_serve.tiny_model import make_tiny_model
from pr2_serve.transfer.wire import DEFAULT_BUCKET_BYTES
from tests.helpers import API_KEY, start_server
from trainer.transfer import CollectivePusher


def one_update(srv, http, send, version: int, size: int) -> dict:
    """``send(version)``, then a generate on the new version; MB/s, split, peak extra RSS."""

    def update():
        res = send(version)
        [s] = http.generate([[1, 2, 3]], temperature=0.0, max_tokens=1).samples
        assert s.weight_version == version, s.weight_version
        return res

    t = time.perf_counter()
    res, rss = peak_rss_during(srv.proc.pid, update)
    wall = time.perf_counter() - t
    return {
        "end_to_end_MBps": size / wall / 1e6,
        "receive_MBps": size / res["receive_seconds"] / 1e6,
        "check_s": res["check_seconds"],
        "apply_s": res["apply_seconds"],
        "canary_s": res["canary_seconds"],
        "peak_extra_rss_MiB": rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mib", type=int, default=DEFAULT_BUCKET_BYTES >> 20)
    ap.add_argument("--out", default="benchmarks/results/weights.json")
    ap.add_argument("--workdir", default="runs", help="model + server state (a fast disk)")
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = make_tiny_model(Path(tmp) / "model", seed=0, spec=BENCH_SPEC, predictor="random")
        state_dict = load_file(str(model / "model.safetensors"))
        size = sum(t.numel() * t.element_size() for t in state_dict.values())
        flags = ("--max-upload-bytes", str(4 << 30), "--enable-weight-transfer")
        srv = start_server(model, Path(tmp) / "state", *flags)
        try:
            http = HttpClient(srv.http, api_key=API_KEY)
            pusher = CollectivePusher([http], bucket_bytes=args.bucket_mib << 20)
            ways = {
                "http": lambda v: http.push_weights(state_dict, v),
                "gloo": lambda v: pusher.push(state_dict, v)[0],
            }
            pusher.push(state_dict, 1)  # the group is opened once, before timing
            runs: dict[str, list[dict]] = {}
            for k in range(args.repeats):
                for i, (name, send) in enumerate(ways.items()):
                    version = 2 + 2 * k + i
                    runs.setdefault(name, []).append(one_update(srv, http, send, version, size))
            pusher.close()
        finally:
            srv.stop()
    results = {
        "state_dict_MB": size / 1e6,
        "bucket_MiB": args.bucket_mib,
        **{k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()},
    }
    e2e = {k: results[k]["end_to_end_MBps"] for k in ways}
    results["gloo_vs_http"] = e2e["gloo"] / e2e["http"]
    for name in ways:
        r = results[name]
        print(
            f"{name} ({size / 1e6:.0f} MB): end-to-end {r['end_to_end_MBps']:.0f} MB/s, receive "
            f"{r['receive_MBps']:.0f} MB/s, check {r['check_s']:.2f} s, apply "
            f"{r['apply_s']:.2f} s, canary {r['canary_s']:.2f} s, peak extra server RSS "
            f"{r['peak_extra_rss_MiB']:.0f} MiB"
        )
    print(f"gloo / HTTP end to end: {results['gloo_vs_http']:.2f}x")
    write_results(args.out, args, results)


if __name__ == "__main__":
    main()
