"""Pure routing math vs straightforward references; runs on CUDA too when a GPU is present."""

from __future__ import annotations

import pytest
import torch

from pr2_serve.core.routing import (
    deviation_counts,
    deviation_histogram,
    gate_weights,
    pr2_route,
    select_experts,
    selection_scores,
)
from tests.devices import DEVICES


def reference_route(h, w_r, w_p, k, renormalize):
    """Loop-per-token reference: softmax over all experts, pick top-k of z + b, gather."""
    weights, ids = [], []
    for t in range(h.shape[0]):
        z = w_r @ h[t]
        b = w_p @ h[t]
        order = sorted(range(len(z)), key=lambda e: -(z[e] + b[e]).item())[:k]
        p = torch.softmax(z.double(), 0)[order]
        if renormalize:
            p = p / p.sum()
        weights.append(p)
        ids.append(torch.tensor(order))
    return torch.stack(weights), torch.stack(ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_pr2_route_matches_reference(device, renormalize, k):
    g = torch.Generator().manual_seed(k)
    h = torch.randn(37, 64, generator=g)
    w_r, w_p = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g) * 0.5
    ref_w, ref_ids = reference_route(h, w_r, w_p, k, renormalize)
    h, w_r, w_p = h.to(device), w_r.to(device), w_p.to(device)
    w, ids = pr2_route(h, h @ w_r.T, w_p, k, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    order = ids.long().sort(-1)
    ref_order = ref_ids.sort(-1)
    assert torch.equal(order.values.cpu(), ref_order.values)
    got_w = w.gather(-1, order.indices).cpu().double()
    torch.testing.assert_close(got_w, ref_w.gather(-1, ref_order.indices), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_predictor_is_plain_topk_bitwise(device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 32, generator=g).to(device)
    z = h @ torch.randn(8, 32, generator=g).to(device).T
    w, ids = pr2_route(h, z, torch.zeros(8, 32, device=device), 2, True)
    vals, plain = torch.topk(z, 2, dim=-1, sorted=False)  # what vLLM's CPU router does
    assert torch.equal(ids.long(), plain)
    assert torch.equal(w, torch.softmax(vals, -1).float())


@pytest.mark.parametrize("device", DEVICES)
def test_gating_uses_unadjusted_logits(device):
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0]], device=device)
    h = torch.tensor([[1.0]], device=device)
    w_p = torch.tensor([[10.0], [10.0], [0.0], [0.0]], device=device)  # W_p h = [10, 10, 0, 0]
    ids = select_experts(z, h, w_p, 2)
    assert sorted(ids[0].tolist()) == [0, 1]
    w = gate_weights(z, ids, renormalize=False)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(w, p.gather(-1, ids))


@pytest.mark.parametrize("device", DEVICES)
def test_deviation_counts_and_histogram(device):
    z = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3, device=device)  # fresh top-2 = {0, 1}
    replayed = torch.tensor([[1, 0], [0, 2], [2, 3]], device=device)
    counts = deviation_counts(replayed, z)
    assert counts.tolist() == [0, 1, 2]
    assert deviation_histogram(counts, 2).tolist() == [1, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_pr2_route_compiles_without_graph_breaks(device):
    """The server's routing must be compile-safe (CUDA build: torch.compile + CUDA graphs)."""
    if device == "cpu":
        pytest.importorskip("torch._inductor")
    h = torch.randn(16, 64, device=device)
    z, w_p = torch.randn(16, 8, device=device), torch.randn(8, 64, device=device)
    explain = torch._dynamo.explain(pr2_route)(h, z, w_p, 2, True)
    assert explain.graph_break_count == 0


def test_gpu_routing_benchmark_smoke_on_cpu():
    """The CUDA benchmark script runs end to end (tiny sizes, eager, on the CPU)."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_routing.py",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--tokens",
            "1",
            "16",
            "--hidden",
            "64",
            "--experts",
            "8",
            "--top-k",
            "2",
            "--iters",
            "5",
            "--no-compile",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "routes equal" in out.stdout and "ROUTES DIFFER" not in out.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_selection_scores_is_z_plus_predictor_offset(device):
    g = torch.Generator().manual_seed(1)
    h, w_r, w_p = (torch.randn(s, generator=g).to(device) for s in [(6, 16), (8, 16), (8, 16)])
    z = h @ w_r.T
    torch.testing.assert_close(selection_scores(z, h, w_p), z + h @ w_p.T)  # reference
    assert torch.equal(selection_scores(z, h, torch.zeros_like(w_p)), z)  # zero: exactly z
    assert selection_scores(z, h, None) is z
