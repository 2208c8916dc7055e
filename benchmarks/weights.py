"""Weight updates end to end on the bench-sized checkpoint, in one run: HTTP push, gRPC push,
gloo transfer (``POST /v1/weights/transfer/...``) and load-from-path, on this tree's server and
on a baseline server (``--baseline-ref``, default the commit before the weight-movement work:
that commit's server code, the same client), both up at once, each transport alternating
between them every repeat (the same machine load for both: the figures to compare are the
ratios).

End to end = the trainer's state dict in memory -> the server answering a generate on the new
version (HTTP/gRPC: the client encodes and hashes the safetensors body, uploads it; gloo: the
trainer broadcasts packed buckets; load: the trainer writes the file into ``--weights-dir`` and
asks the server to load it; then the server checks, applies, runs the canary and commits).
Every tensor changes before every update (as after an optimizer step): nothing can be skipped.
Also the server's peak extra RSS during the update and its reported split (receive, check,
apply, canary). Goals: gloo >= 400 MB/s end to end, HTTP >= 300 MB/s, gRPC >= HTTP (or >= 0.8x
of vLLM's own reload rate on this build, if that is lower), peak extra RSS <= 2 buckets + the
undo copy. ``--experts N`` changes the checkpoint's size (84: ~1.07 GB); ``--profile`` times
the pieces of one update instead (:mod:`benchmarks.weights_profile`).

    .venv/bin/python benchmarks/weights.py [--repeats 3] [--baseline-ref REF | --no-baseline]
    .venv/bin/python benchmarks/weights.py --profile --out benchmarks/results/weights_profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from math import nan
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import weights_doc
from benchmarks.api import peak_rss_during
from benchmarks.common import BENCH_SPEC, write_results
from pr2_serve.client import GrpcClient, HttpClient
from pr2_serve.client.payload import safetensors_parts
from pr2_serve.tiny.tiny_model import make_tiny_model
from pr2_serve.transfer.bucket_plan import DEFAULT_BUCKET_BYTES
from tests.helpers import API_KEY, start_server
from trainer.rollouts.collective_push import CollectivePusher

BASELINE_REF = "f8aa2cb"  # the staged path: receive to a file, check it, reload, canary
TRANSPORTS = ("http", "grpc", "gloo", "load")


def rss_mib(srv) -> float:
    return psutil.Process(srv.proc.pid).memory_info().rss / 2**20


def one_update(srv, http, send, version: int, size: int) -> dict:
    """``send(version)``, then a generate on the new version; MB/s, split, the server's RSS
    before and its peak extra RSS during."""

    def update():
        res = send(version)
        [s] = http.generate([[1, 2, 3]], temperature=0.0, max_tokens=1).samples
        assert s.weight_version == version, s.weight_version
        return res

    before = rss_mib(srv)
    t = time.perf_counter()
    res, rss = peak_rss_during(srv.proc.pid, update)
    wall = time.perf_counter() - t
    return {
        "end_to_end_MBps": size / wall / 1e6,
        "end_to_end_s": wall,
        "receive_MBps": size / res["receive_seconds"] / 1e6,
        "check_s": res.get("check_seconds", nan),  # the gRPC result has no check/canary split
        "apply_s": res["apply_seconds"],
        "canary_s": res.get("canary_seconds", nan),
        "server_s": res["seconds"],
        "peak_extra_rss_MiB": rss,
        "rss_before_MiB": before,  # what the server held between updates
        "peak_rss_MiB": before + rss,
    }


def step(state_dict: dict) -> None:
    """Change every tensor (in place, finite), as an optimizer step does."""
    with torch.no_grad():
        for t in state_dict.values():
            t.view(-1)[0] += 1e-3


class Side:
    """One server under test and its clients (``drop``: its ``--weights-dir``)."""

    def __init__(self, srv, state_dict: dict, drop: Path, bucket_bytes: int, checksum: str) -> None:
        self.srv, self.drop, self.sd = srv, drop, state_dict
        self.http, self.rpc = HttpClient(srv.http, api_key=API_KEY), GrpcClient(srv.grpc, API_KEY)
        self.pusher = CollectivePusher([self.http], bucket_bytes=bucket_bytes)
        self.version = self.http.info()["weight_version"] + 1
        self.pusher.push(state_dict, self.version)  # the group is opened once, before timing
        self.ways = {
            "http": lambda v: self.http.push_weights(self.sd, v, checksum),
            "grpc": lambda v: self.rpc.push_weights(self.sd, v, checksum),
            "gloo": lambda v: self.pusher.push(self.sd, v)[0],
            "load": self.load,
        }
        self.runs: dict[str, list[dict]] = {}

    def load(self, v: int) -> dict:
        path = self.drop / f"step-{v}.safetensors"
        save_file(self.sd, str(path))
        return self.http.load_weights(str(path), v)

    def update(self, way: str, size: int, timed: bool = True) -> None:
        self.version += 1
        step(self.sd)
        res = one_update(self.srv, self.http, self.ways[way], self.version, size)
        if timed:
            self.runs.setdefault(way, []).append(res)
        self.http.info()  # waits for the version's fingerprints: the next update (on either
        time.sleep(0.2)  # server) starts on a quiet machine, not beside this one's tail

    def medians(self) -> dict:
        """Per transport, the median of every figure, and the largest peak extra RSS."""
        out = {}
        for k, v in self.runs.items():
            out[k] = {m: statistics.median(r[m] for r in v) for m in v[0]}
            out[k]["peak_extra_rss_MiB_max"] = max(r["peak_extra_rss_MiB"] for r in v)
        return out


def baseline_tree(ref: str, into: Path) -> Path:
    """This repository's tree at ``ref``, extracted into ``into`` (its server code)."""
    root = Path(__file__).resolve().parents[1]
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def serve(model, tmp: Path, name: str, tree: Path):
    """A server of ``tree``'s code with its own state and ``--weights-dir``."""
    drop = tmp / f"{name}-drop"
    drop.mkdir()
    flags = ("--max-upload-bytes", str(4 << 30), "--enable-weight-transfer")
    flags += ("--weights-dir", str(drop))
    # ``python -m pr2_serve.server.main`` imports from its working directory first
    with contextlib.chdir(tree):
        srv = start_server(
            model, tmp / f"{name}-state", *flags, env={"PYTHONPATH": str(tree)}, timeout=900
        )
    return srv, drop


def measure(model, tmp: Path, trees: dict, state_dict: dict, size: int, args) -> dict:
    """Both servers up at once; every transport alternates between them each repeat (the same
    machine load for both); medians per server and transport."""
    servers, sides = [], {}
    try:
        for name, tree in trees.items():
            srv, drop = serve(model, tmp, name, tree)
            servers.append(srv)
            # what each side's client sends (the default baseline predates xxh128)
            checksum = args.baseline_checksum if name == "baseline" else "xxh128"
            sides[name] = Side(srv, state_dict, drop, args.bucket_mib << 20, checksum)
        writes = []
        for k in range(args.warmup + args.repeats):  # the first ones untimed: warm-up
            for way in TRANSPORTS:
                for side in sides.values():
                    side.update(way, size, timed=k >= args.warmup)
            writes.append(file_write(tmp / "writes", state_dict, k))
        out = {name: side.medians() for name, side in sides.items()}
        for key, way in (("file_write_MBps", "new"), ("file_overwrite_MBps", "over")):
            rates = [size / w[way] / 1e6 for w in writes[args.warmup :]]
            out[key] = {"median": statistics.median(rates), "per_repeat": rates}
        new = sides["new"].runs
        out["paired"] = {"new_grpc_vs_new_http": paired_ratio(new["http"], new["grpc"])}
        return out
    finally:
        for side in sides.values():
            side.pusher.close()
        for srv in servers:
            srv.stop()


def file_write(folder: Path, state_dict: dict, k: int, kept: int = 2) -> dict:
    """Seconds to write the version's bytes on the state directory's disk, once into a new file
    (``new``: the ``kept`` latest stay, as kept versions do) and once over a file written the
    same way before (``over``: what an update does over a spare, whose pages are cached)."""
    folder.mkdir(exist_ok=True)
    parts = safetensors_parts(state_dict)  # the body a push sends, not hashed
    seconds = {}
    for way, path, flags in (
        ("new", folder / f"v{k}.safetensors", os.O_TRUNC),
        ("over", folder / "spare.safetensors", 0),
    ):
        t = time.perf_counter()
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644), "wb") as f:
            for p in parts:
                f.write(p)
        seconds[way] = time.perf_counter() - t
    (folder / f"v{k - kept}.safetensors").unlink(missing_ok=True)
    return seconds


def paired_ratio(a: list[dict], b: list[dict], n_boot: int = 4000, seed: int = 0) -> dict:
    """End-to-end MB/s of ``b`` over ``a``, repeat by repeat (the two ran seconds apart in each
    repeat: the machine's swings between repeats cancel): the median of the per-repeat ratios
    and its 95 % interval (percentile bootstrap over repeats)."""
    r = np.array([y["end_to_end_MBps"] / x["end_to_end_MBps"] for x, y in zip(a, b, strict=True)])
    boots = np.median(np.random.default_rng(seed).choice(r, (n_boot, len(r))), axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95": [float(lo), float(hi)], "per_repeat": r.tolist()}


def report(results: dict) -> None:
    size = results["state_dict_MB"]
    for which in ("baseline", "new"):
        for name in TRANSPORTS:
            r = results.get(which, {}).get(name)
            if r is None:
                continue
            print(
                f"{which} {name} ({size:.0f} MB): end-to-end {r['end_to_end_MBps']:.0f} MB/s "
                f"({r['end_to_end_s']:.2f} s), receive {r['receive_MBps']:.0f} MB/s, check "
                f"{r['check_s']:.2f} s, apply {r['apply_s']:.2f} s, canary {r['canary_s']:.2f} s, "
                f"server {r['server_s']:.2f} s, peak extra RSS {r['peak_extra_rss_MiB']:.0f} MiB "
                f"over {r.get('rss_before_MiB', nan):.0f} MiB before"
            )
    for k, v in results["ratios"].items():
        print(f"{k}: {v:.2f}x")
    if "file_write_MBps" in results:
        rate = results["file_write_MBps"]["median"]
        print(f"a new file of the same bytes written at {rate:.0f} MB/s")
    if "file_overwrite_MBps" in results:
        rate = results["file_overwrite_MBps"]["median"]
        print(f"the same bytes written over a file written before at {rate:.0f} MB/s")
    for k, v in results.get("paired", {}).items():
        lo, hi = v["ci95"]
        print(f"{k}, paired by repeat: median {v['median']:.2f}x (95% CI {lo:.2f}-{hi:.2f})")


def ratios(results: dict) -> dict:
    new, base = results["new"], results.get("baseline")
    out = {
        f"new_{k}_vs_new_http": new[k]["end_to_end_MBps"] / new["http"]["end_to_end_MBps"]
        for k in TRANSPORTS
        if k != "http"
    }
    if base:
        for k in TRANSPORTS:
            out[f"{k}_new_vs_baseline"] = new[k]["end_to_end_MBps"] / base[k]["end_to_end_MBps"]
        out["new_gloo_vs_baseline_http"] = (
            new["gloo"]["end_to_end_MBps"] / base["http"]["end_to_end_MBps"]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates per transport first")
    ap.add_argument("--bucket-mib", type=int, default=DEFAULT_BUCKET_BYTES >> 20)
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the baseline server")
    ap.add_argument(
        "--baseline-checksum",
        default="sha256",
        choices=["sha256", "xxh128"],
        help="the baseline's upload checksum (xxh128: a baseline that takes it, for an A/B)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    ap.add_argument("--out", default="benchmarks/results/weights.json")
    ap.add_argument("--workdir", default="runs", help="model + server state (a fast disk)")
    ap.add_argument("--experts", type=int, default=BENCH_SPEC.num_experts, help="per MoE layer")
    ap.add_argument("--profile", action="store_true", help="where one update's time goes")
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp).resolve()
        spec = dataclasses.replace(BENCH_SPEC, num_experts=args.experts)
        model = make_tiny_model(tmp / "model", seed=0, spec=spec, predictor="random")
        state_dict = load_file(str(model / "model.safetensors"))
        size = sum(t.numel() * t.element_size() for t in state_dict.values())
        results: dict = {"state_dict_MB": size / 1e6, "bucket_MiB": args.bucket_mib}
        if args.profile:
            from benchmarks.weights_profile import profile_update

            results["profile"] = profile_update(
                model, state_dict, tmp, args.repeats, args.bucket_mib << 20
            )
            print(json.dumps(results, indent=1))
            return written(args, results)
        trees = {"new": Path(__file__).resolve().parents[1]}
        if not args.no_baseline:
            trees = {"baseline": baseline_tree(args.baseline_ref, tmp / "baseline-tree"), **trees}
        results.update(measure(model, tmp, trees, state_dict, size, args))
    results["ratios"] = ratios(results)
    report(results)
    written(args, results)


def written(args, results: dict) -> None:
    """Write the results; the docs page's figures too when they are its files."""
    write_results(args.out, args, results)
    if Path(args.out).resolve() in (*weights_doc.RESULTS, weights_doc.PROFILE):
        weights_doc.rewrite()


if __name__ == "__main__":
    main()
