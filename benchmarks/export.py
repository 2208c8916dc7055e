"""Weight push per training step: the old export path vs the in-memory one, in the same run.

Before (kept here only as the baseline): ``save_pretrained`` into a temporary directory, read
the file back, rename the predictors, write it again, then the client hashes and streams that
file. After (``Trainer.push``): the checkpoint names made in memory
(:meth:`trainer.run.policy.Policy.checkpoint_tensors`), then the safetensors body streamed from
the tensors' own memory (:mod:`pr2_serve.client.payload`), hashed and uploaded. "export" is
the time until the upload starts (the body ready and hashed). Both push the
bench-sized checkpoint (policy + predictors, as a pr2 step does) to a real ``pr2-serve`` on
loopback, over HTTP and gRPC, alternating old/new; the server's share (receive, check, apply,
canary) is the same code for both. Goal: push time per step <= 0.5x the old path's; also
printed: the trainer's share (push minus the server's reported seconds), which is what the
export change can shrink.

    .venv/bin/python benchmarks/export.py [--repeats 3]
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
from pr2_serve.client import GrpcClient, HttpClient
from pr2_serve.client.payload import weights_payload
from pr2_serve.tiny.tiny_model import make_tiny_model
from tests.helpers import API_KEY, start_server
from trainer.run.policy import Policy


def old_export(policy: Policy, out_dir: Path, with_predictor: bool = True) -> Path:
    """The export before the in-memory path (``Policy.export`` as it was): save, reload,
    rename, write again."""
    from safetensors.torch import load_file, save_file

    policy.model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="1000GB")
    path = out_dir / "model.safetensors"
    t = load_file(str(path))
    t = {
        k.replace(".block_sparse_moe.predictor.", ".mlp.predictor."): v
        for k, v in t.items()
        if with_predictor or ".predictor." not in k
    }
    save_file(t, str(path), metadata={"format": "pt"})
    return path


def push_old(policy: Policy, client, version: int, workdir: Path) -> tuple[float, float, dict]:
    """(export seconds, push seconds end to end, server result) of the old path."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        body = weights_payload(old_export(policy, Path(tmp)))
        t1 = time.perf_counter()
        res = client.push_weights(body, version)
    return t1 - t0, time.perf_counter() - t0, res


def push_new(policy: Policy, client, version: int) -> tuple[float, float, dict]:
    """(export seconds, push seconds end to end, server result) of the in-memory path."""
    t0 = time.perf_counter()
    body = weights_payload(policy.checkpoint_tensors(with_predictor=True))
    t1 = time.perf_counter()
    res = client.push_weights(body, version)
    return t1 - t0, time.perf_counter() - t0, res


def measure(policy: Policy, clients: dict, repeats: int, workdir: Path) -> dict:
    """Median export / end-to-end seconds per path and protocol, and the ratios new / old."""
    runs: dict = {}
    version = clients["http"].info()["weight_version"]
    for _ in range(repeats):
        for proto, client in clients.items():
            for path in ("old", "new"):
                version += 1
                if path == "old":
                    exp, total, res = push_old(policy, client, version, workdir)
                else:
                    exp, total, res = push_new(policy, client, version)
                server = res["receive_seconds"] + res["apply_seconds"]
                server += res.get("check_seconds", 0.0) + res.get("canary_seconds", 0.0)
                row = runs.setdefault(proto, {}).setdefault(path, [])
                # the trainer's own share: everything but the server's receive/check/apply/canary
                row.append(
                    {
                        "export_s": exp,
                        "push_s": total,
                        "server_s": server,
                        "trainer_s": total - server,
                    }
                )
    out: dict = {}
    for proto, paths in runs.items():
        med = {
            p: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            for p, rows in paths.items()
        }
        med["push_ratio"] = med["new"]["push_s"] / med["old"]["push_s"]
        med["export_ratio"] = med["new"]["export_s"] / med["old"]["export_s"]
        med["trainer_ratio"] = med["new"]["trainer_s"] / med["old"]["trainer_s"]
        out[proto] = med
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/export.json")
    ap.add_argument("--workdir", default="runs", help="model, server state, old path's temp dir")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        model = make_tiny_model(Path(tmp) / "model", seed=0, spec=BENCH_SPEC, predictor="random")
        size_mb = (model / "model.safetensors").stat().st_size / 1e6
        policy = Policy(str(model))
        srv = start_server(model, Path(tmp) / "state", "--max-upload-bytes", str(4 << 30))
        try:
            clients = {"http": HttpClient(srv.http, API_KEY), "grpc": GrpcClient(srv.grpc, API_KEY)}
            results = {"checkpoint_MB": size_mb, **measure(policy, clients, args.repeats, work)}
        finally:
            srv.stop()
    for proto in ("http", "grpc"):
        r = results[proto]
        print(
            f"push per step over {proto} ({size_mb:.0f} MB): old {r['old']['push_s']:.2f} s "
            f"(export {r['old']['export_s']:.2f} s), new {r['new']['push_s']:.2f} s "
            f"(export {r['new']['export_s']:.2f} s) -> {r['push_ratio']:.2f}x push, "
            f"{r['export_ratio']:.2f}x export, {r['trainer_ratio']:.2f}x the trainer's share "
            f"({r['old']['trainer_s']:.2f} -> {r['new']['trainer_s']:.2f} s); the server's share "
            f"(the same code both ways) {r['old']['server_s']:.2f} / {r['new']['server_s']:.2f} s"
        )
    write_results(args.out, args, results)


if __name__ == "__main__":
    main()
