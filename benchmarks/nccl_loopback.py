"""NCCL loopback of the bucketed weight receive, pure torch (no vLLM): rank 0 packs tensors into
buckets as vLLM's ``pack_tensors`` does (tensors end to end, a bucket closes once it exceeds the
bucket size) and broadcasts them; every other rank receives each bucket into a GPU buffer of its
own, checks it on the GPU (``torch.isfinite`` of its sum), unpacks it and compares it with what
was sent; a NaN put in the last tensor must be found in the last bucket. Reports the receive
rate. One GPU: a group of one rank (the NCCL communicator, the buffers and the GPU check run;
nothing crosses a link); two or more: ranks 0 and 1 on two GPUs. ``--cpu``: gloo, two processes
(the same code, a smoke run).

    python3 benchmarks/nccl_loopback.py [--cpu] [--mib 256] [--bucket-mib 64]
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pr2_serve.transfer.bucket_plan import plan_buckets


def tensors(mib: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = (mib << 20) // 4 // 64
    out = [torch.randn(n, generator=g).to(device) for _ in range(63)]
    out.append(torch.randn(n, generator=g).to(device, torch.bfloat16))
    out[-1][-1] = float("nan")  # found in the last bucket
    return out


def run(rank: int, world: int, device: str, mib: int, bucket: int, port: int) -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    sent = tensors(mib, dev)
    sizes = [t.numel() * t.element_size() for t in sent]
    buckets, bad, t0 = plan_buckets(sizes, bucket), [], time.perf_counter()
    for k, (a, b) in enumerate(buckets):
        if rank == 0:
            buf = torch.cat([t.reshape(-1).view(torch.uint8) for t in sent[a:b]])
        else:
            buf = torch.empty(sum(sizes[a:b]), dtype=torch.uint8, device=dev)
        dist.broadcast(buf, src=0)
        pos = 0
        for i in range(a, b):
            t = buf[pos : pos + sizes[i]].view(sent[i].dtype).reshape(sent[i].shape)
            if not bool(torch.isfinite(t.float().sum())):  # the check, on the device
                bad.append((k, i))
            assert torch.equal(t.nan_to_num(), sent[i].nan_to_num()), i
            pos += sizes[i]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert bad == [(len(buckets) - 1, len(sent) - 1)], bad
    if rank == world - 1:
        print(
            f"{backend} loopback, {world} rank(s) on {device}: {sum(sizes) / 1e6:.0f} MB in "
            f"{len(buckets)} buckets, {sum(sizes) / seconds / 1e9:.2f} GB/s, values equal, "
            f"the NaN found in the last bucket",
            flush=True,
        )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="gloo, two processes (a smoke run)")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--bucket-mib", type=int, default=64)
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --cpu)")
    world = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mib = min(args.mib, 16) if args.cpu else args.mib
    bucket = max(1, math.ceil(args.bucket_mib * (1 << 20) * mib / args.mib))
    mp.spawn(run, args=(world, device, mib, bucket, port), nprocs=world, join=True)


if __name__ == "__main__":
    main()
